"""Validate, then time, the Numba backend's state operations against measured ceilings.

    python benchmarks/run.py [--configs edge,mid,large] [--out benchmarks/results]

Needs a CUDA GPU and PyTorch (for the ceilings and the baselines a user would otherwise write).
For each config (ISSUE 4: edge, mid, large) it

1. validates ``scatter_mtp_states``, ``clear_states``, ``capture_*`` and the baselines (two in
   PyTorch, one in CuPy where it is installed) against the NumPy reference on random data, at the
   config's slot sizes and batch (2 layers);
2. measures the ceilings in the same run: an eager device-to-device copy (torch ``copy_``,
   event-timed, of 2 GiB and of the op's own byte count) and a ``cuMemsetD32Async`` of the pools;
3. times each operation's device time with CUDA events around many queued calls (a sleep kernel
   first, so host dispatch never shows up as device time), rotating among several caches where one
   would fit in L2, median of several repeats; and from CUDA-graph replays;
4. times host overhead: each eager call from the Python call to its return (queued behind a
   sleep kernel, see ``host_time_us``), and each graph replay's ``cuGraphLaunch``.

It prints one table and writes ``<out>/results-<card>-<date>.json`` (one record per config and op).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from cuda.bindings import driver  # noqa: E402
from numba import cuda  # noqa: E402

import mamba_cache  # noqa: E402
from benchmarks.records import new_results_path  # noqa: E402
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402

GIB = 2**30
L2_BYTES = 50 * 2**20
REPEATS = 7

CONFIGS = {
    # 24 layers, 32 heads x 64 x 128 fp16, conv 4096 x 4, batch 1, verify 4: latency-bound
    "edge": (
        Config(
            num_recurrent_layers=24,
            max_batch_size=1,
            recurrent_state_num_heads=32,
            recurrent_state_head_dim=64,
            recurrent_state_size=128,
            conv_dim=4096,
            conv_kernel=4,
            max_intermediate_seq_len=4,
        ),
        [2],
    ),
    # Mamba2-2.7B-like: 64 layers, 80 heads x 64 x 128, conv 5376 x 4, batch 8, verify 4
    "mid": (
        Config(
            num_recurrent_layers=64,
            max_batch_size=8,
            recurrent_state_num_heads=80,
            recurrent_state_head_dim=64,
            recurrent_state_size=128,
            conv_dim=5376,
            conv_kernel=4,
            max_intermediate_seq_len=4,
        ),
        [1, 2, 3, 4, 0, 2, 3, 1],
    ),
    # 24 layers, 128 heads x 64 x 128 fp32 recurrent, batch 64, verify 4
    "large": (
        Config(
            num_recurrent_layers=24,
            max_batch_size=64,
            recurrent_state_num_heads=128,
            recurrent_state_head_dim=64,
            recurrent_state_size=128,
            conv_dim=8448,
            conv_kernel=4,
            max_intermediate_seq_len=4,
            recurrent_state_dtype="float32",
        ),
        [(0, 1, 2, 3, 4, 3, 2, 1)[i % 8] for i in range(64)],
    ),
}


def check(result):
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err!r}")
    return result[1] if len(result) == 2 else result[1:]


# ---------------------------------------------------------------- byte counts
def slot_bytes(config: Config) -> tuple[int, int]:
    return (
        config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize,
        config.conv_slot_elems * config.conv_state_dtype.itemsize,
    )


def copied_rows(accept: list[int], seq_len: int) -> int:
    return sum(1 for a in accept if 1 <= a < seq_len)


def useful_bytes(config: Config, op: str, accept: list[int]) -> int:
    """Bytes read + written that the operation must move."""
    rec, conv = slot_bytes(config)
    layers = config.num_recurrent_layers
    if op == "scatter":
        return 2 * layers * copied_rows(accept, config.max_intermediate_seq_len) * (rec + conv)
    if op == "clear":
        return layers * config.max_batch_size * (rec + conv)  # written only
    if op == "capture":
        return 2 * layers * (rec + conv)
    raise ValueError(op)


# ---------------------------------------------------------------- torch views and baselines
def torch_pools(manager):
    pools = manager._pools
    layers, slots = pools.recurrent.shape[:2]
    view = {}
    for kind in ("recurrent", "conv"):
        main = torch.as_tensor(getattr(pools, kind), device="cuda").reshape(layers, slots, -1)
        inter = torch.as_tensor(getattr(pools, f"intermediate_{kind}"), device="cuda").reshape(
            layers, -1, main.shape[2]
        )
        view[kind] = (main, inter)
    return view


def torch_accept_rows(accept: torch.Tensor, seq_len: int) -> tuple:
    """(active, valid [active] bool, source row of each row in the [B*S] intermediate view)."""
    active = accept.shape[0]
    step = accept.long() - 1
    valid = (step >= 0) & (step < seq_len - 1)
    return active, valid, torch.arange(active, device=accept.device) * seq_len + step.clamp(0, seq_len - 1)


def torch_stacked_scatter(view, accept: torch.Tensor, seq_len: int) -> None:
    """What a user would write: advanced indexing over the stacked layers, no host sync."""
    active, valid, src_rows = torch_accept_rows(accept, seq_len)
    for main, inter in view.values():
        gathered = inter[:, src_rows]
        main[:, :active] = torch.where(valid[None, :, None], gathered, main[:, :active])


def torch_per_layer_scatter(view, accept: torch.Tensor, seq_len: int) -> None:
    """The same, one layer at a time."""
    active, valid, src_rows = torch_accept_rows(accept, seq_len)
    for main, inter in view.values():
        for layer in range(main.shape[0]):
            main[layer, :active] = torch.where(valid[:, None], inter[layer, src_rows], main[layer, :active])


def cupy_pools(manager):
    import cupy

    return {kind: tuple(cupy.asarray(t) for t in pair) for kind, pair in torch_pools(manager).items()}


def cupy_stacked_scatter(view, accept, seq_len: int) -> None:
    """The stacked advanced-indexing baseline written with CuPy (``accept``: a CuPy int32 array)."""
    import cupy

    active = accept.shape[0]
    step = accept.astype(cupy.int64) - 1
    valid = (step >= 0) & (step < seq_len - 1)
    src_rows = cupy.arange(active) * seq_len + cupy.clip(step, 0, seq_len - 1)
    for main, inter in view.values():
        main[:, :active] = cupy.where(valid[None, :, None], inter[:, src_rows], main[:, :active])


def have_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- timing
def sleep_then(stream: torch.cuda.Stream, us: float = 1000.0) -> None:
    """Keep the GPU busy for about ``us`` microseconds so queued work is timed without host gaps."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(max(us, 1000.0) * 2000))  # ~2 cycles per ns on these cards


def device_time_us(calls, stream: torch.cuda.Stream, n: int, host_us: float = 0.0) -> float:
    """Median device time of one call, from events around ``n`` queued calls, cycling ``calls``.

    ``host_us``: the host time of one call, if large; the sleep kernel then covers all ``n``.
    """
    samples = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep_then(stream, 2 * n * host_us)
        start.record(stream)
        for i in range(n):
            calls[i % len(calls)]()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / n)
    return statistics.median(samples)


def host_time_us(call, stream: torch.cuda.Stream, n: int = 200) -> float:
    """Median host time of one call, from the Python call to its return.

    The calls queue behind a long sleep kernel on ``stream``, so the device neither throttles the
    host (a full launch queue) nor sits idle between calls (the first launch after a long wait
    costs more): what is left is the host's own work per call.
    """
    samples = []
    for _ in range(3):
        torch.cuda.synchronize()
        sleep_then(stream, 50_000)
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def capture_graph(calls, stream: torch.cuda.Stream):
    """Capture one pass over ``calls`` on ``stream`` into an instantiated CUDA graph."""
    handle = stream.cuda_stream
    stream.synchronize()
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
    try:
        for call in calls:
            call()
    finally:
        graph = check(driver.cuStreamEndCapture(handle))
    return check(driver.cuGraphInstantiate(graph, 0))


def graph_times_us(exec_graph, calls_per_replay: int, stream: torch.cuda.Stream, n: int = 200) -> tuple[float, float]:
    """(device us per call, host us per cuGraphLaunch) from graph replays."""
    handle = stream.cuda_stream
    check(driver.cuGraphLaunch(exec_graph, handle))
    samples, host = [], []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep_then(stream)
        start.record(stream)
        t0 = time.perf_counter()
        for _ in range(n):
            check(driver.cuGraphLaunch(exec_graph, handle))
        host.append((time.perf_counter() - t0) / n * 1e6)
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / (n * calls_per_replay))
    return statistics.median(samples), statistics.median(host)


def copy_gbps(nbytes: int, stream: torch.cuda.Stream) -> float:
    """Eager device-to-device copy bandwidth (bytes read + written), rotating buffers under L2."""
    nbytes = max(nbytes // 2, 1 << 20)
    pairs = max(1, min(8, math.ceil(4 * L2_BYTES / (2 * nbytes))))
    bufs = [
        (torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
        for _ in range(pairs)
    ]
    calls = [lambda d=d, s=s: d.copy_(s) for d, s in bufs]
    n = max(8, min(400, int(2e9 // nbytes)))
    with torch.cuda.stream(stream):
        us = device_time_us(calls, stream, n)
    return 2 * nbytes / us / 1e3


def memset_gbps(pools, stream: torch.cuda.Stream) -> float:
    """cuMemsetD32Async over the manager's own main pools (bytes written)."""
    targets = [(int(p.device_ctypes_pointer.value), p.nbytes // 4) for p in pools]
    total = sum(p.nbytes for p in pools)

    def memset():
        for pointer, words in targets:
            check(driver.cuMemsetD32Async(pointer, 0, words, stream.cuda_stream))

    us = device_time_us([memset], stream, max(8, min(200, int(4e9 // total))))
    return total / us / 1e3


def record_op(
    records: list, config: str, op: str, nbytes: int, device_us, host_us, ceiling, graph=None, **extra
) -> dict:
    """Append (and return) one timing record: bandwidth and ratio to ``ceiling`` (GB/s), host and graph times.

    ``graph``: optional ``(device us, host us per replay)`` of a graph replay; ``extra`` is added as is.
    """
    gbps = nbytes / device_us / 1e3
    rec = {
        "config": config,
        "op": op,
        "bytes": nbytes,
        "device_us": round(device_us, 2),
        "useful_gbps": round(gbps, 1),
        "ceiling_gbps": round(ceiling, 1),
        "ratio_to_ceiling": round(gbps / ceiling, 3),
        "host_us_per_call": None if host_us is None else round(host_us, 2),
    }
    if graph is not None:
        rec["graph_device_us"] = round(graph[0], 2)
        rec["graph_host_us_per_replay"] = round(graph[1], 2)
        rec["graph_ratio_to_ceiling"] = round(nbytes / graph[0] / 1e3 / ceiling, 3)
    rec.update(extra)
    records.append(rec)
    return rec


# ---------------------------------------------------------------- validation
def validate(config: Config, accept: list[int], rng) -> None:
    """Every timed operation, and both baselines, against the NumPy reference at these slot sizes."""
    small = Config(**{**config.__dict__, "num_recurrent_layers": 2})
    ref, dev = NumpyMambaCacheManager(small), NumbaMambaCacheManager(small)
    base = NumbaMambaCacheManager(small)
    pools = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")

    def fill():
        for pool in pools:
            target = getattr(ref._pools, pool)
            values = rng.integers(0, 256, size=target.nbytes, dtype=np.uint8).view(target.dtype).reshape(target.shape)
            target[...] = values
            for manager in (dev, base):
                getattr(manager._pools, pool).copy_to_device(values)

    def same(manager, what):
        for pool in pools:
            if getattr(ref._pools, pool).tobytes() != getattr(manager._pools, pool).copy_to_host().tobytes():
                raise AssertionError(f"{what}: pool {pool} differs from the NumPy reference")

    acc = np.array(accept, dtype=np.int32)
    fill()
    ref.scatter_mtp_states(acc)
    dev.scatter_mtp_states(cuda.to_device(acc))
    same(dev, "scatter_mtp_states")
    for baseline in (torch_stacked_scatter, torch_per_layer_scatter):
        fill()
        ref.scatter_mtp_states(acc)
        baseline(
            torch_pools(base), torch.tensor(accept, dtype=torch.int32, device="cuda"), small.max_intermediate_seq_len
        )
        torch.cuda.synchronize()
        same(base, baseline.__name__)
    if have_cupy():
        import cupy

        fill()
        ref.scatter_mtp_states(acc)
        cupy_stacked_scatter(cupy_pools(base), cupy.asarray(acc), small.max_intermediate_seq_len)
        cupy.cuda.runtime.deviceSynchronize()
        same(base, "cupy_stacked_scatter")
    fill()
    slot = len(accept) - 1
    for kind in ("recurrent", "conv"):
        got = getattr(dev, f"capture_{kind}_states")(slot)
        want = getattr(ref, f"capture_{kind}_states")(slot)
        if any(g.copy_to_host().tobytes() != w.tobytes() for g, w in zip(got, want, strict=True)):
            raise AssertionError(f"capture_{kind}_states differs from the NumPy reference")
    ref.clear_states()
    dev.clear_states()
    same(dev, "clear_states")


# ---------------------------------------------------------------- one config
def bench_config(name: str, config: Config, accept: list[int], copy_ceiling: float, rng) -> list[dict]:
    stream = torch.cuda.Stream()
    validate(config, accept, rng)
    seq = config.max_intermediate_seq_len
    scatter_bytes = useful_bytes(config, "scatter", accept)
    rotations = max(1, min(8, math.ceil(4 * L2_BYTES / max(scatter_bytes, 1))))
    managers = [NumbaMambaCacheManager(config, stream=stream.cuda_stream) for _ in range(rotations)]
    for manager in managers:  # random, non-zero states (the bits do not matter for the timing)
        for pool in manager._pools:
            torch.as_tensor(pool, device="cuda").view(torch.uint8).random_(1, 255)
    acc = torch.tensor(accept, dtype=torch.int32, device="cuda")
    acc_numba = cuda.as_cuda_array(acc)
    handle = stream.cuda_stream
    torch.cuda.synchronize()
    records = []
    record = functools.partial(record_op, records, name)

    # scatter: ours, and the two PyTorch baselines
    same_bytes_ceiling = copy_gbps(scatter_bytes, stream)
    ours = [lambda m=m: m.scatter_mtp_states(acc_numba, stream=handle) for m in managers]
    n_scatter = max(20, min(2000, int(4e10 // max(scatter_bytes, 1) // 10)))
    scatter_us = device_time_us(ours, stream, n_scatter)
    host_us = host_time_us(ours[0], stream)
    graph = capture_graph(ours, stream)
    graph_us = graph_times_us(graph, len(ours), stream)
    views = [torch_pools(m) for m in managers]
    baselines = {}
    with torch.cuda.stream(stream):
        for fn in (torch_stacked_scatter, torch_per_layer_scatter):
            calls = [lambda v=v, fn=fn: fn(v, acc, seq) for v in views]
            n = max(5, n_scatter // (20 if fn is torch_per_layer_scatter else 4))
            baselines[fn.__name__] = device_time_us(calls, stream, n)
    if have_cupy():
        import cupy

        cupy_views = [cupy_pools(m) for m in managers]
        cupy_acc = cupy.asarray(acc)
        with cupy.cuda.ExternalStream(handle):
            calls = [lambda v=v: cupy_stacked_scatter(v, cupy_acc, seq) for v in cupy_views]
            baselines["cupy_stacked_scatter"] = device_time_us(calls, stream, max(5, n_scatter // 4))
    floor_us = scatter_bytes / copy_ceiling / 1e3
    record(
        "scatter_mtp_states",
        scatter_bytes,
        scatter_us,
        host_us,
        copy_ceiling,
        graph_us,
        copy_same_bytes_gbps=round(same_bytes_ceiling, 1),
        bytes_over_ceiling_us=round(floor_us, 2),
        speedup_vs_torch_stacked=round(baselines["torch_stacked_scatter"] / scatter_us, 2),
        speedup_vs_torch_per_layer=round(baselines["torch_per_layer_scatter"] / scatter_us, 2),
        torch_stacked_us=round(baselines["torch_stacked_scatter"], 2),
        torch_per_layer_us=round(baselines["torch_per_layer_scatter"], 2),
        rotations=rotations,
        **(
            {
                "speedup_vs_cupy_stacked": round(baselines["cupy_stacked_scatter"] / scatter_us, 2),
                "cupy_stacked_us": round(baselines["cupy_stacked_scatter"], 2),
            }
            if "cupy_stacked_scatter" in baselines
            else {}
        ),
    )

    # clear: ours against a memset of the same pools
    main = managers[0]
    clear_bytes = useful_bytes(config, "clear", accept)
    memset = memset_gbps([main._pools.recurrent, main._pools.conv], stream)
    clear_calls = [lambda m=m: m.clear_states(stream=handle) for m in managers]
    clear_us = device_time_us(clear_calls, stream, max(10, min(500, int(2e10 // clear_bytes))))
    clear_graph = graph_times_us(capture_graph(clear_calls, stream), len(clear_calls), stream, n=50)
    record(
        "clear_states",
        clear_bytes,
        clear_us,
        host_time_us(clear_calls[0], stream),
        memset,
        clear_graph,
        ceiling_kind="memset",
    )

    # capture: a fresh allocation per call, so the device time is timed behind a sleep kernel
    capture_bytes = useful_bytes(config, "capture", accept)
    capture_calls = [
        lambda m=m: (m.capture_recurrent_states(0, stream=handle), m.capture_conv_states(0, stream=handle))
        for m in managers
    ]
    capture_host = host_time_us(capture_calls[0], stream, 20)
    capture_us = device_time_us(capture_calls, stream, min(40, 8 * rotations), host_us=capture_host)
    record(
        "capture_states",
        capture_bytes,
        capture_us,
        capture_host,
        copy_ceiling,
        copy_same_bytes_gbps=round(copy_gbps(capture_bytes, stream), 1),
    )

    # capture into caller-provided buffers (out=): no allocation, so it times like any kernel
    outs = [
        {
            kind: cuda.device_array((pool.shape[0], 1, *pool.shape[2:]), dtype=pool.dtype)
            for kind, pool in (("recurrent", m._pools.recurrent), ("conv", m._pools.conv))
        }
        for m in managers
    ]
    capture_out_calls = [  # both kinds, every layer, one launch
        lambda m=m, o=o: m.capture_states(0, handle, out=(o["recurrent"], o["conv"]))
        for m, o in zip(managers, outs, strict=True)
    ]
    for call in capture_out_calls:
        call()
    capture_out_us = device_time_us(capture_out_calls, stream, max(10, min(500, int(2e10 // capture_bytes))))
    record(
        "capture_out",
        capture_bytes,
        capture_out_us,
        host_time_us(capture_out_calls[0], stream),
        copy_ceiling,
        graph_times_us(capture_graph(capture_out_calls, stream), len(capture_out_calls), stream, n=50),
        copy_same_bytes_gbps=round(copy_gbps(capture_bytes, stream), 1),
    )
    del managers, views, outs
    if have_cupy():
        import cupy

        del cupy_views
        cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="edge,mid,large")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng()
    card = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    copy_ceiling = copy_gbps(2 * GIB, stream)
    print(f"{card}: eager device-to-device copy of 2 GiB: {copy_ceiling:.0f} GB/s (bytes read + written)")
    records = []
    for name in args.configs.split(","):
        config, accept = CONFIGS[name]
        records += bench_config(name, config, accept, copy_ceiling, rng)
        print(f"  {name}: done", flush=True)
    header = (
        f"{'config':<6} {'op':<20} {'device us':>10} {'GB/s':>7} {'ceiling':>8} {'ratio':>6} {'host us':>8} "
        f"{'graph us':>9} {'graph host':>10}  vs torch stacked / per-layer / cupy"
    )
    print(header)
    for r in records:
        extra = ""
        if "speedup_vs_torch_stacked" in r:
            extra = f"  {r['speedup_vs_torch_stacked']:.1f}x / {r['speedup_vs_torch_per_layer']:.1f}x"
            if "speedup_vs_cupy_stacked" in r:
                extra += f" / {r['speedup_vs_cupy_stacked']:.1f}x"
        print(
            f"{r['config']:<6} {r['op']:<20} {r['device_us']:>10.1f} {r['useful_gbps']:>7.0f} {r['ceiling_gbps']:>8.0f}"
            f" {r['ratio_to_ceiling']:>6.2f} {r['host_us_per_call'] or 0:>8.1f} {r.get('graph_device_us', 0):>9.1f}"
            f" {r.get('graph_host_us_per_replay', 0):>10.1f}{extra}"
        )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import numba
    import numba.cuda

    meta = {
        "card": card,
        "date": datetime.date.today().isoformat(),
        "copy_ceiling_gbps": round(copy_ceiling, 1),
        "copy_ceiling_kind": "eager torch copy_ of 2 GiB, CUDA events, median",
        "versions": {
            "mamba_cache": mamba_cache.__version__,
            "numba": numba.__version__,
            "numba_cuda": importlib.metadata.version("numba-cuda"),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    path = new_results_path(out, "results", card)
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
