"""Host overhead of every device-array operation, for every way an engine passes its arguments.

python benchmarks/engine.py      # needs a CUDA GPU, PyTorch (CuPy and cuda.core where installed)

For each op (scatter, tree commit, copy_slots, the prefix store's restore and restore_many, clear,
clear_slot, capture_states into out=) and each combination of index-array kind (Numba, torch, CuPy) and
stream kind (None, a Numba stream, a distinct torch Stream object each call as
``torch.cuda.current_stream()`` gives it, a distinct int handle each call, a cuda.core stream), it
first checks the call against the NumPy reference, then times the host side of one eager call
(median, calls queued behind a sleep kernel so the device never throttles the host). The stream
objects are made before the timing: what making one costs is the caller's, printed and recorded
apart (op ``stream_object``). The baseline in the same run: the host time of a torch elementwise
launch (``x.add_(1)``).
Records: op ``host_overhead`` with ``arg_kind``, ``stream_kind`` and ``ratio_to_torch``; target
<= 1.5.

Then ``capture_states(slot, out=(recurrent_out, conv_out))`` on the mid and large configs of
benchmarks/run.py, with outputs of each kind (Numba device arrays, torch tensors, CuPy arrays):
checked bit for bit against the slot first, then its device time (events around many queued
calls) against the eager 2 GiB copy ceiling measured in the same run, its host time, and its
device time from CUDA-graph replays. Records: op ``capture_out`` with ``config``, ``arg_kind``,
``ratio_to_ceiling`` (target >= 0.95) and ``host_us_per_call`` (target <= 10).
Written to benchmarks/results/engine-<card>-<date>.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from numba import cuda  # noqa: E402

from benchmarks.records import new_results_path  # noqa: E402
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402

CONFIG = Config(
    num_recurrent_layers=24,
    max_batch_size=8,
    recurrent_state_num_heads=32,
    recurrent_state_head_dim=64,
    recurrent_state_size=128,
    conv_dim=4096,
    conv_kernel=4,
    max_intermediate_seq_len=4,
)


N = 300


def host_us(call, streams=None) -> float:
    """Median host time of one eager ``call(stream)``; ``streams[i]`` is the i-th call's stream object.

    Stream objects are made before the timing starts (a fresh one per call where the kind is "a new
    object each call"): what ``torch.cuda.current_stream()`` itself costs is the caller's, and is
    printed apart.
    """
    samples = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms of device work ahead of the calls
        for i in range(N):
            stream = streams[i] if streams is not None else None
            t0 = time.perf_counter()
            call(stream)
            samples.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def main() -> int:
    card = torch.cuda.get_device_name()
    ref, dev = NumpyMambaCacheManager(CONFIG), NumbaMambaCacheManager(CONFIG)
    rng = np.random.default_rng(20261128)
    accept = np.array([2, 0, 3, 1, 4, 2, -1, 1], dtype=np.int32)
    indices = rng.permutation(8).astype(np.int32)
    nodes = np.array([[0, 2, -1]] * 8, dtype=np.int32)
    side = torch.cuda.Stream()
    numba_stream = cuda.external_stream(side.cuda_stream)
    arrays = {
        "numba": lambda a: cuda.to_device(a),
        "torch": lambda a: torch.from_numpy(a).cuda(),
    }
    try:
        import cupy

        arrays["cupy"] = lambda a: cupy.asarray(a)
    except ImportError:
        pass
    streams = {
        "none": [None] * N,
        "numba": [numba_stream] * N,
        "torch_new_object": [torch.cuda.current_stream() for _ in range(N)],  # N distinct objects
        "int_new_each_call": [int(side.cuda_stream) + 0 for _ in range(N)],
    }
    try:
        from cuda.core import Device

        device = Device()
        device.set_current()
        streams["cuda_core"] = [device.create_stream()] * N
    except Exception as error:  # noqa: BLE001 - cuda.core missing or a different API: skip that kind
        print(f"cuda.core stream skipped: {error}")
    out = {
        k: cuda.device_array((24, 1, *p.shape[2:]), dtype=p.dtype)
        for k, p in (("recurrent", dev._pools.recurrent), ("conv", dev._pools.conv))
    }

    # correctness first: every arg kind through the scatter, against the reference
    for kind, make in arrays.items():
        ref.scatter_mtp_states(accept, state_indices=indices)
        dev.scatter_mtp_states(make(accept), state_indices=make(indices))
        torch.cuda.synchronize()
        for pool in ("recurrent", "conv"):
            want, got = getattr(ref._pools, pool), getattr(dev._pools, pool).copy_to_host()
            assert want.tobytes() == got.tobytes(), (kind, pool)
    print("validated: scatter with", ", ".join(arrays), "index arrays matches the NumPy reference")

    # the prefix store's restores: one entry holding slot 5's state, matched once
    from mamba_cache.prefix import PrefixStateCache

    store = PrefixStateCache(dev, entries=4, block_size=16)
    tokens = np.arange(32, dtype=np.int32)
    store.insert(tokens[:16], 5)
    handle = store.match(tokens)
    assert handle is not None and handle.length == 16
    src_slots, dst_slots = np.array([0, 1], dtype=np.int32), np.array([6, 7], dtype=np.int32)
    restore_slots = np.array([2, 3], dtype=np.int32)

    x = torch.zeros(1024, device="cuda")
    baseline = host_us(lambda _: x.add_(1))
    print(f"{card}: torch elementwise launch {baseline:.2f} us host")
    records = [{"op": "torch_elementwise", "host_us_per_call": round(baseline, 2)}]
    for kind in ("torch_new_object", "int_new_each_call"):
        make = {"torch_new_object": torch.cuda.current_stream, "int_new_each_call": lambda: int(side.cuda_stream)}
        us = host_us(lambda _, make=make[kind]: make())
        print(f"  (making the stream object, the caller's cost, not counted below: {kind} {us:.2f} us)")
        records.append({"op": "stream_object", "stream_kind": kind, "host_us_per_call": round(us, 2)})
    for arg_kind, make in arrays.items():
        acc, idx, nod = make(accept), make(indices), make(nodes)
        src, dst, rslots = make(src_slots), make(dst_slots), make(restore_slots)
        for stream_kind, stream_objects in streams.items():
            ops = {
                "scatter_mtp_states": lambda s: dev.scatter_mtp_states(acc, s, state_indices=idx),
                "scatter_accepted_tree_states": lambda s: dev.scatter_accepted_tree_states(nod, acc, idx, s),
                "copy_slots": lambda s: dev.copy_slots(src, dst, s),
                "prefix_restore_many": lambda s: store.restore_many([handle, handle], rslots, s),
                "prefix_restore": lambda s: store.restore(handle, 2, s),
                "clear_states": lambda s: dev.clear_states(s),
                "clear_slot": lambda s: dev.clear_slot(3, s),
                "capture_out": lambda s: dev.capture_states(1, s, out=(out["recurrent"], out["conv"])),
            }
            for op, call in ops.items():
                if arg_kind != "numba" and op in ("prefix_restore", "clear_states", "clear_slot", "capture_out"):
                    continue  # no index array: the same call for every arg kind
                us = host_us(call, stream_objects)
                records.append(
                    {
                        "op": "host_overhead",
                        "call": op,
                        "arg_kind": arg_kind,
                        "stream_kind": stream_kind,
                        "host_us_per_call": round(us, 2),
                        "ratio_to_torch": round(us / baseline, 2),
                    }
                )
                print(f"  {op:<30} {arg_kind:<6} {stream_kind:<18} {us:7.2f} us  {us / baseline:5.2f}x torch")
    worst = max(r["ratio_to_torch"] for r in records if r["op"] == "host_overhead")
    print(f"worst ratio to the torch launch: {worst:.2f} (target <= 1.5)")
    records += bench_capture_out(card)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    new_results_path(results, "engine", card).write_text(
        json.dumps({"card": card, "records": records}, indent=1) + "\n"
    )
    return 0


def bench_capture_out(card: str) -> list[dict]:
    """capture_states into caller outputs: validated, then device time vs the copy ceiling, host time, graphs."""
    from benchmarks.run import CONFIGS, GIB, capture_graph, copy_gbps, device_time_us, graph_times_us, host_time_us

    stream = torch.cuda.Stream()
    handle = stream.cuda_stream
    ceiling = copy_gbps(2 * GIB, stream)
    print(f"{card}: eager device-to-device copy of 2 GiB: {ceiling:.0f} GB/s (the capture_out ceiling)")
    kinds = {
        "numba": lambda shape, dtype: cuda.device_array(shape, dtype=dtype),
        "torch": lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda"),
    }
    try:
        import cupy

        kinds["cupy"] = lambda shape, dtype: cupy.empty(shape, dtype=dtype)
    except ImportError:
        pass
    records = []
    for name in ("mid", "large"):
        config = dataclasses.replace(CONFIGS[name][0], max_intermediate_seq_len=0)  # capture reads main pools only
        dev = NumbaMambaCacheManager(config, stream=handle)
        pools = (dev._pools.recurrent, dev._pools.conv)
        for pool in pools:
            torch.as_tensor(pool, device="cuda").view(torch.uint8).random_(1, 255)
        torch.cuda.synchronize()  # the fill runs on torch's stream, the captures on another
        nbytes = 2 * sum(p.nbytes // p.shape[1] for p in pools)  # one slot of every layer, read + written
        for arg_kind, make in kinds.items():
            out = tuple(make((p.shape[0], 1, *p.shape[2:]), p.dtype) for p in pools)
            slot = config.max_batch_size - 1
            dev.capture_states(slot, handle, out=out)  # prepares the launch; validated here
            torch.cuda.synchronize()
            for got, pool in zip(out, pools, strict=True):
                want = torch.as_tensor(pool, device="cuda")[:, slot : slot + 1]
                got = torch.as_tensor(got, device="cuda")
                if not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                    raise AssertionError(f"capture_states into {arg_kind} outputs differs from the slot ({name})")
            call = lambda dev=dev, out=out, slot=slot: dev.capture_states(slot, handle, out=out)  # noqa: E731
            device_us = device_time_us([call], stream, max(10, min(500, int(2e10 // nbytes))))
            host_us = host_time_us(call, stream)
            graph_us, graph_host_us = graph_times_us(capture_graph([call], stream), 1, stream, n=50)
            same_bytes = copy_gbps(nbytes, stream)
            record = {
                "op": "capture_out",
                "config": name,
                "arg_kind": arg_kind,
                "bytes": nbytes,
                "device_us": round(device_us, 2),
                "ceiling_gbps": round(ceiling, 1),
                "ratio_to_ceiling": round(nbytes / device_us / 1e3 / ceiling, 3),
                "copy_same_bytes_gbps": round(same_bytes, 1),
                "ratio_to_same_bytes_copy": round(nbytes / device_us / 1e3 / same_bytes, 3),
                "host_us_per_call": round(host_us, 2),
                "graph_device_us": round(graph_us, 2),
                "graph_ratio_to_ceiling": round(nbytes / graph_us / 1e3 / ceiling, 3),
                "graph_host_us_per_replay": round(graph_host_us, 2),
            }
            records.append(record)
            print(
                f"  capture_out {name:<5} {arg_kind:<6} {device_us:9.2f} us device  "
                f"{record['ratio_to_ceiling']:.3f} of ceiling (target >= 0.95), "
                f"{record['ratio_to_same_bytes_copy']:.3f} of a same-size copy  {host_us:6.2f} us host (target <= 10)"
            )
        del dev, out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return records


if __name__ == "__main__":
    sys.exit(main())
