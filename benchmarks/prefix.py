"""Validate, then time, slot copies and the prefix-state store against copy ceilings of the same run.

    python benchmarks/prefix.py [--configs mid,large] [--entries 8] [--seed 1] [--out benchmarks/results]

Needs a CUDA GPU and PyTorch (for the ceilings). For each config (``benchmarks/run.py``'s mid and
large) it

1. validates every timed operation against the NumPy reference on random bits at the config's slot
   sizes (2 layers): ``copy_slots``, ``restore`` / ``restore_many``, ``insert``, the tracking commit,
   and a host-tier offload + restore;
2. measures the ceilings in the same run: an eager device-to-device ``torch`` copy of the op's own
   byte count (and of 2 GiB), and a pinned host<->device ``copy_`` of the same bytes;
3. times each op's device time from CUDA events around many queued calls (behind a sleep kernel),
   the host time of one eager call, and, where the op is graph-capturable, the device time and the
   ``cuGraphLaunch`` host time of a graph replay:

   - ``copy_slots``: B/2 slot pairs, one launch;
   - ``prefix_restore``: one entry into one slot; ``prefix_restore_many``: B/2 distinct entries into
     B/2 slots (a repeated entry list: staged once, graph-capturable; ``host_us_restaged``: the host
     time when the list changes every call);
   - ``prefix_insert``: a new block-aligned prefix each call (hash + LRU eviction + one launch);
   - ``scatter_tracked``: the commit with every row also checkpointing a step, against the plain
     scatter followed by a separate copy of the same checkpoints (two launches);
   - ``host_tier_d2h`` / ``host_tier_h2d``: one entry device->host (an offload) and host->slot (a
     host hit), one strided 2-D copy per state kind (``copies``), against a pinned
     ``cudaMemcpyAsync`` of the same bytes;
   - ``match``: host time of a lookup of a 32k-token prompt with 256-token blocks.

4. runs the workload simulation of ``benchmarks/prefix_workload.py`` (host only, ``--seed``).

It prints the tables and writes ``<out>/prefix-<card>-<date>.json`` (the workload's records, op
``prefix_workload``, included).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
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

from benchmarks import prefix_workload  # noqa: E402
from benchmarks.records import new_results_path  # noqa: E402
from benchmarks.run import (  # noqa: E402
    CONFIGS,
    GIB,
    capture_graph,
    copy_gbps,
    device_time_us,
    graph_times_us,
    host_time_us,
    record_op,
    slot_bytes,
)
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.prefix import PrefixStateCache  # noqa: E402


# ---------------------------------------------------------------- validation
def fill_same(pairs, rng) -> None:
    """Write the same random bits into each (numpy array, device array) pair."""
    for host, device in pairs:
        values = rng.integers(0, 256, size=host.nbytes, dtype=np.uint8).view(host.dtype).reshape(host.shape)
        host[...] = values
        device.copy_to_device(values)


def validate(config: Config, rng) -> None:
    """Every timed operation against the NumPy reference at these slot sizes (2 layers)."""
    small = Config(**{**config.__dict__, "num_recurrent_layers": 2})
    ref, dev = NumpyMambaCacheManager(small), NumbaMambaCacheManager(small)
    bs = max(small.max_intermediate_seq_len, 4)
    ref_store = PrefixStateCache(ref, entries=2, block_size=bs, host_entries=1)
    dev_store = PrefixStateCache(dev, entries=2, block_size=bs, host_entries=1)
    pools = [(getattr(ref._pools, k), getattr(dev._pools, k)) for k in ref._pools._fields]
    pools += list(zip(ref_store._pools, dev_store._pools, strict=True))
    fill_same(pools, rng)

    def same(what):
        cuda.synchronize()
        for host, device in pools + list(zip(ref_store._host_pools, dev_store._host_pools, strict=True)):
            got = device if isinstance(device, np.ndarray) else device.copy_to_host()
            if host.tobytes() != got.tobytes():
                raise AssertionError(f"{what}: differs from the NumPy reference")

    batch = small.max_batch_size
    half = batch // 2
    src, dst = np.arange(half, dtype=np.int32), np.arange(half, 2 * half, dtype=np.int32)
    ref.copy_slots(src, dst)
    dev.copy_slots(cuda.to_device(src), cuda.to_device(dst))
    same("copy_slots")
    for i in range(3):  # inserts that evict (entries=2) and offload to the host tier
        tokens = [i] * bs
        for s in (ref_store, dev_store):
            s.insert(tokens, slot=i % batch)
    same("insert + offload")
    for s in (ref_store, dev_store):
        s.restore(s.match([0] * (bs + 1)), slot=batch - 1)  # a host-tier hit
        s.restore(s.match([2] * (bs + 1)), slot=0)
        handles = [s.match([2] * (bs + 1)), s.match([1] * (bs + 1))]
        s.restore_many(handles, np.array([1, batch - 1], np.int32))
    same("restore, host restore, restore_many")
    rows = min(batch, 2)
    for m in (ref, dev):
        m.reshape_intermediate_states(rows, small.max_intermediate_seq_len)
    entries = [ref_store.reserve() for _ in range(rows)]
    assert [dev_store.reserve() for _ in range(rows)] == entries
    accept = np.full(rows, small.max_intermediate_seq_len, np.int32)
    steps = np.zeros(rows, np.int32)
    ref.scatter_mtp_states(accept, store=ref_store, track_entries=np.array(entries, np.int32), track_steps=steps)
    dev.scatter_mtp_states(
        cuda.to_device(accept),
        store=dev_store,
        track_entries=cuda.to_device(np.array(entries, np.int32)),
        track_steps=cuda.to_device(steps),
    )
    same("scatter_mtp_states with tracking")


# ---------------------------------------------------------------- timing helpers
def pinned_copy_gbps(nbytes: int, stream: torch.cuda.Stream, to_device: bool) -> float:
    """Pinned host<->device copy bandwidth of ``nbytes`` (one cudaMemcpyAsync per call)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    if to_device:
        calls = [lambda: device.copy_(host, non_blocking=True)]
    else:
        calls = [lambda: host.copy_(device, non_blocking=True)]
    with torch.cuda.stream(stream):
        us = device_time_us(calls, stream, 20)
    return nbytes / us / 1e3


def host_median_us(call, n: int = 50) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


# ---------------------------------------------------------------- one config
def bench_config(name: str, config: Config, entries: int, copy_ceiling: float, rng) -> list[dict]:
    validate(config, rng)
    stream = torch.cuda.Stream()
    handle = stream.cuda_stream
    manager = NumbaMambaCacheManager(config, stream=handle)
    bs = 256
    half = max(1, config.max_batch_size // 2)
    # restore_many reads `half` distinct entries (one entry read `half` times is served from L2 and
    # overstated the bandwidth: 1.64 of the ceiling on large); the tracked scatter keeps --entries rows
    tracked_entries, entries = entries, max(entries, half + 1)
    store = PrefixStateCache(manager, entries=entries, block_size=bs, stream=handle)
    tiered = PrefixStateCache(manager, entries=1, block_size=bs, host_entries=2, stream=handle)
    for pool in (*manager._pools, *store._pools, *tiered._pools):
        torch.as_tensor(pool, device="cuda").view(torch.uint8).random_(1, 255)
    torch.cuda.synchronize()
    layers, batch, seq = config.num_recurrent_layers, config.max_batch_size, config.max_intermediate_seq_len
    rec, conv = slot_bytes(config)
    entry_bytes = layers * (rec + conv)  # one slot (or entry) of every layer, both kinds
    records = []
    record = functools.partial(record_op, records, name)

    def timed(op, calls, nbytes, n=50, graph=True, **extra):
        ceiling = copy_gbps(nbytes, stream)
        device_us = device_time_us(calls, stream, n)
        host_us = host_time_us(calls[0], stream, 100)
        replay = graph_times_us(capture_graph(calls, stream), len(calls), stream, n=50) if graph else None
        record(op, nbytes, device_us, host_us, ceiling, replay, copy_2gib_gbps=round(copy_ceiling, 1), **extra)

    # copy_slots: B/2 pairs, both kinds, every layer (read + written)
    src = cuda.to_device(np.arange(half, dtype=np.int32))
    dst = cuda.to_device(np.arange(half, 2 * half, dtype=np.int32))  # B = 1: slot 1 is out of range, skipped
    timed("copy_slots", [lambda: manager.copy_slots(src, dst, stream=handle)], 2 * half * entry_bytes)

    # insert: a new prefix per call (LRU eviction, hashing of one block, one launch)
    prefixes = [np.full(bs, i, dtype=np.int32) for i in range(4 * entries)]
    counter = iter(range(10**9))
    insert_calls = [lambda: store.insert(prefixes[next(counter) % len(prefixes)], slot=0, stream=handle)]
    timed("prefix_insert", insert_calls, 2 * entry_bytes, graph=False)

    # restore: one entry into one slot (scalar indices: capturable); restore_many: B/2 of them
    held = store.insert(np.full(bs, -1, dtype=np.int32), slot=min(1, batch - 1), stream=handle)
    store.pin(held)
    timed("prefix_restore", [lambda: store.restore(held, slot=0, stream=handle)], 2 * entry_bytes)
    many_slots = cuda.to_device(np.arange(half, dtype=np.int32))
    many = [held]
    for i in range(half - 1):  # distinct entries: every byte read once from HBM
        many.append(store.insert(np.full(bs, -10 - i, dtype=np.int32), slot=min(1, batch - 1), stream=handle))
        store.pin(many[-1])
    assert len({h.entry for h in many}) == half
    # a repeated entry list is staged once: the eager calls and the graph replay re-read it
    timed("prefix_restore_many", [lambda: store.restore_many(many, many_slots, stream=handle)], 2 * half * entry_bytes)
    lists = itertools.cycle([many, many[::-1]])  # a changed list each call: the host time with staging
    restaged_us = host_time_us(lambda: store.restore_many(next(lists), many_slots, stream=handle), stream, 100)
    records[-1]["host_us_restaged"] = round(restaged_us, 2)
    for h in many[1:]:
        store.unpin(h)

    # the tracking commit: every row commits step 0 and checkpoints step 0, one launch
    rows = batch
    manager.reshape_intermediate_states(rows, seq)
    reserved = []
    store.unpin(held)
    for _ in range(min(rows, tracked_entries)):  # as many as before the store grew
        reserved.append(store.reserve(stream=handle))
    tracking_rows = len(reserved)
    accept = cuda.to_device(np.full(rows, 1, dtype=np.int32))
    track_entries = cuda.to_device(np.array(reserved + [-1] * (rows - tracking_rows), dtype=np.int32))
    track_steps = cuda.to_device(np.array([0] * tracking_rows + [-1] * (rows - tracking_rows), dtype=np.int32))
    commit_bytes = 2 * rows * entry_bytes if seq > 1 else 0
    track_bytes = 2 * tracking_rows * entry_bytes

    def tracked():
        manager.scatter_mtp_states(
            accept, stream=handle, store=store, track_entries=track_entries, track_steps=track_steps
        )

    inter = tuple(
        getattr(manager._pools, f"intermediate_{k}").reshape(
            (layers, config.max_batch_size * seq, *getattr(manager._pools, k).shape[2:])
        )
        for k in ("recurrent", "conv")
    )
    src_rows = cuda.to_device(np.arange(tracking_rows, dtype=np.int32) * seq)
    from mamba_cache.core.launch import DeviceArg

    src_arg = DeviceArg(src_rows, int(src_rows.device_ctypes_pointer.value), src_rows.shape)
    dst_arg = DeviceArg(
        track_entries, int(track_entries.device_ctypes_pointer.value), (tracking_rows,)
    )  # the first tracking_rows entries of track_entries
    resolved = manager._stream(handle)

    def separate():
        manager.scatter_mtp_states(accept, stream=handle)
        manager._copy_rows(store._pools, inter, src_arg, dst_arg, tracking_rows, resolved)

    separate_us = device_time_us([separate], stream, 30)
    timed(
        "scatter_tracked",
        [tracked],
        commit_bytes + track_bytes,
        n=30,
        tracking_rows=tracking_rows,
        scatter_then_copy_us=round(separate_us, 2),
        scatter_then_copy_host_us=round(host_time_us(separate, stream, 100), 2),
    )
    for entry in reserved:
        store.release(entry)

    # host tier: one entry device -> host (an offload) and host -> slot (a host hit)
    d2h_ceiling = pinned_copy_gbps(entry_bytes, stream, to_device=False)
    h2d_ceiling = pinned_copy_gbps(entry_bytes, stream, to_device=True)
    d2h = [lambda: manager._entry_to_host(tiered._pools, 0, tiered._host_pools, 0, resolved)]
    d2h[0]()
    copies = manager._launches[("host_copy", id(tiered._pools[0]), id(tiered._host_pools[0]), True)].copies_per_call
    record(
        "host_tier_d2h",
        entry_bytes,
        device_time_us(d2h, stream, 10),
        host_time_us(d2h[0], stream, 20),
        d2h_ceiling,
        ceiling_kind="pinned cudaMemcpyAsync D2H of the same bytes",
        copies=copies,
    )
    tiered.insert(np.full(bs, -2, dtype=np.int32), slot=2, stream=handle)
    tiered.insert(np.full(bs, -3, dtype=np.int32), slot=2, stream=handle)  # pushes the first to the host tier
    host_hit = tiered.match(np.full(bs + 1, -2, dtype=np.int32))
    assert host_hit is not None and host_hit.host, host_hit
    h2d = [lambda: tiered.restore(host_hit, slot=min(3, batch - 1), stream=handle)]
    record(
        "host_tier_h2d",
        entry_bytes,
        device_time_us(h2d, stream, 10),
        host_time_us(h2d[0], stream, 20),
        h2d_ceiling,
        ceiling_kind="pinned cudaMemcpyAsync H2D of the same bytes",
        copies=copies,
    )

    # match: host time for a 32k-token prompt, 256-token blocks, the first half cached
    prompt = rng.integers(0, 50_000, size=32 * 1024).astype(np.int32)
    matcher = PrefixStateCache(manager, entries=1, block_size=256)
    matcher.insert(prompt[: 16 * 1024], slot=0)
    torch.cuda.synchronize()
    match_us = host_median_us(lambda: matcher.match(prompt))
    records.append(
        {"config": name, "op": "match", "tokens": prompt.size, "block_size": 256, "host_us": round(match_us, 1)}
    )
    matcher.close()
    store.close()
    tiered.close()
    manager.close()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="mid,large")
    parser.add_argument("--entries", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--seed", type=int, default=1, help="of the workload simulation")
    args = parser.parse_args(argv)
    rng = np.random.default_rng()
    card = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    copy_ceiling = copy_gbps(2 * GIB, stream)
    print(f"{card}: eager device-to-device copy of 2 GiB: {copy_ceiling:.0f} GB/s (bytes read + written)")
    records = []
    for name in args.configs.split(","):
        config, _ = CONFIGS[name]
        records += bench_config(name, config, args.entries, copy_ceiling, rng)
        print(f"  {name}: done", flush=True)
    print(f"{'config':<6} {'op':<20} {'device us':>10} {'GB/s':>7} {'ceiling':>8} {'ratio':>6} {'host us':>8}", end="")
    print(f" {'graph us':>9}")
    for r in records:
        if r["op"] == "prefix_workload":
            continue
        if r["op"] == "match":
            print(f"{r['config']:<6} {'match (32k tokens)':<20} host {r['host_us']:.1f} us")
            continue
        print(
            f"{r['config']:<6} {r['op']:<20} {r['device_us']:>10.1f} {r['useful_gbps']:>7.0f} {r['ceiling_gbps']:>8.0f}"
            f" {r['ratio_to_ceiling']:>6.2f} {r['host_us_per_call'] or 0:>8.1f} {r.get('graph_device_us', 0):>9.1f}"
            + (f"  (scatter + copy: {r['scatter_then_copy_us']:.1f} us)" if "scatter_then_copy_us" in r else "")
        )
    # the workload simulation (host only): hit tokens per store size, recorded with the GPU run
    workload = prefix_workload.Workload(seed=args.seed)
    print(f"prefix workload: seed {workload.seed}, {workload}")
    workload_records = prefix_workload.simulate(workload, [4, 16, 64, 256])
    print(prefix_workload.table(workload_records))
    records += workload_records
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"card": card, "date": datetime.date.today().isoformat(), "copy_ceiling_gbps": round(copy_ceiling, 1)}
    path = new_results_path(out, "prefix", card)
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
