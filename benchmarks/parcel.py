"""Validate, then time, moving states between two GPUs and parking them in host memory.

    python benchmarks/parcel.py [--configs mid,large] [--slots 4] [--iters 20] [--out benchmarks/results]
    python benchmarks/parcel.py --backend gloo --configs tiny   # a CPU smoke run (NumPy, gloo): no timings kept

Needs two CUDA GPUs, PyTorch with NCCL and the Numba backend (the default ``--backend nccl``). Two
processes (``torch.multiprocessing`` spawn), one per GPU, one ``NumbaMambaCacheManager`` each with
the config of ``benchmarks/run.py`` (the same model on both: TP 1 to TP 1). For each config:

1. validates: rank 0 exports ``--slots`` random slots (random bits), sends the parcel, rank 1
   imports it into other slots; rank 1's slots must equal rank 0's bit for bit. Offload then resume
   on rank 0 must restore the slots bit for bit.
2. times, each the median of ``--iters`` rounds, both ranks meeting at a barrier before and after
   each round (host clock, every stream synchronised inside the round):

   - ``parcel_transfer``: rank 0 ``export_slots`` + ``send_parcel``, rank 1 ``recv_parcel`` +
     ``import_slots`` (the checksums included), against a raw NCCL ``send`` / ``recv`` of a
     device tensor of the same byte count (the ceiling of the same run);
   - ``offload``: ``offload_slots`` of the slots into the manager's pinned host pool, against a
     pinned device-to-host ``copy_`` of the same bytes;
   - ``resume``: ``resume`` of every handle, against a pinned host-to-device ``copy_`` of the same
     bytes.

It prints one line per record and writes ``<out>/parcel-<card>-<date>.json`` (``record_op`` records,
``ratio_to_ceiling`` = ceiling time / op time). Targets (issue #27): ``parcel_transfer`` >= 0.85,
``offload`` / ``resume`` >= 0.9.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import socket
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba_cache import Config  # noqa: E402

#: A small config for the CPU smoke run (``--backend gloo``): the script's logic, not its timings.
TINY = Config(
    num_recurrent_layers=2, max_batch_size=8, recurrent_state_num_heads=4, recurrent_state_head_dim=8,
    recurrent_state_size=16, conv_dim=4 * 8 + 2 * 16, conv_kernel=4, max_intermediate_seq_len=4,
)  # fmt: skip


def configs(names: list[str]) -> dict:
    """The configs to run: ``benchmarks/run.py``'s by name, or ``tiny`` (the smoke run)."""
    if names == ["tiny"]:
        return {"tiny": TINY}
    from benchmarks.run import CONFIGS

    return {name: CONFIGS[name][0] for name in names}


def _median_round(body, iters: int, sync) -> float:
    """Median seconds of ``body()`` between two barriers (both ranks call it the same number of times)."""
    import torch.distributed as dist

    times = []
    for _ in range(iters):
        sync()
        dist.barrier()
        start = time.perf_counter()
        body()
        sync()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, port: int, args: argparse.Namespace, out: list) -> None:
    import torch
    import torch.distributed as dist

    from mamba_cache.moving.transport import recv_parcel, send_parcel

    gpu = args.backend == "nccl"
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    if gpu:
        from numba import cuda

        cuda.select_device(rank)
        from mamba_cache import NumbaMambaCacheManager as Manager

        def sync():
            cuda.synchronize()
            torch.cuda.synchronize()
    else:
        from mamba_cache import NumpyMambaCacheManager as Manager

        def sync():
            pass

    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    records = []
    for name, config in configs(args.configs.split(",")).items():
        manager = Manager(config)
        rng = np.random.default_rng([args.seed, rank])
        for pool in ("recurrent", "conv"):
            target = getattr(manager.pools, pool)
            bits = rng.integers(0, 256, size=target.nbytes, dtype=np.uint8).view(target.dtype).reshape(target.shape)
            if gpu:
                target.copy_to_device(bits)
            else:
                manager._pools._asdict()[pool][...] = bits
        count = min(args.slots, config.max_batch_size)
        src = np.sort(rng.permutation(config.max_batch_size)[:count]).astype(np.int32)
        dst = src[::-1].copy()

        def host(array):
            return np.array(array) if isinstance(array, np.ndarray) else array.copy_to_host()

        # ---- validate
        if rank == 0:
            parcel = manager.export_slots(src)
            send_parcel(parcel, 1)
            sent = [host(manager.pools.recurrent)[:, src].tobytes(), host(manager.pools.conv)[:, src].tobytes()]
            dist.send_object_list([sent], 1)
            before = [host(manager.pools.recurrent).copy(), host(manager.pools.conv).copy()]
            handles = manager.offload_slots(src)
            manager.clear_states()
            for handle, slot in zip(handles, src, strict=True):
                manager.resume(handle, int(slot))
            sync()
            assert host(manager.pools.recurrent)[:, src].tobytes() == before[0][:, src].tobytes(), "resume"
            assert host(manager.pools.conv)[:, src].tobytes() == before[1][:, src].tobytes(), "resume"
            nbytes = parcel.nbytes
            dist.send(torch.tensor([nbytes], dtype=torch.int64, device=device), 1)
        else:
            manager.import_slots(recv_parcel(0), dst)
            sync()
            box = [None]
            dist.recv_object_list(box, 0)
            got = [host(manager.pools.recurrent)[:, dst].tobytes(), host(manager.pools.conv)[:, dst].tobytes()]
            assert got == box[0], "import: rank 1's slots differ from rank 0's"
            size = torch.zeros(1, dtype=torch.int64, device=device)
            dist.recv(size, 0)
            nbytes = int(size.item())
        # ---- time: parcel vs raw send of the same bytes
        raw = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def parcel_round():
            if rank == 0:
                send_parcel(manager.export_slots(src), 1)
            else:
                manager.import_slots(recv_parcel(0), dst)

        def raw_round():
            if rank == 0:
                dist.send(raw, 1)
            else:
                dist.recv(raw, 0)

        parcel_round()  # warm-up (kernels compiled, buffers allocated once)
        raw_round()
        sync()
        t_parcel = _median_round(parcel_round, args.iters, sync)
        t_raw = _median_round(raw_round, args.iters, sync)
        if rank == 0:
            records.append(
                _record(name, "parcel_transfer", nbytes, t_parcel, t_raw, "nccl send/recv of the same bytes")
            )
        # ---- offload / resume vs pinned memcpy (rank 0; rank 1 meets the barriers)
        per_slot = (
            config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
            + config.conv_slot_elems * config.conv_state_dtype.itemsize
        )
        slot_total = count * per_slot * config.num_recurrent_layers
        pinned = torch.empty(slot_total, dtype=torch.uint8, pin_memory=gpu)
        on_device = torch.empty(slot_total, dtype=torch.uint8, device=device)
        manager.reserve_offload(count)
        state = {}

        def offload_round():
            if rank == 0:
                state["handles"] = manager.offload_slots(src)

        def resume_round():
            if rank == 0:
                for handle, slot in zip(state.pop("handles"), src, strict=True):
                    manager.resume(handle, int(slot))

        def d2h():
            if rank == 0:
                pinned.copy_(on_device, non_blocking=True)

        def h2d():
            if rank == 0:
                on_device.copy_(pinned, non_blocking=True)

        times = {"offload": [], "resume": []}
        for _ in range(args.iters):
            times["offload"].append(_median_round(offload_round, 1, sync))
            times["resume"].append(_median_round(resume_round, 1, sync))
        t_d2h, t_h2d = _median_round(d2h, args.iters, sync), _median_round(h2d, args.iters, sync)
        if rank == 0:
            records.append(
                _record(name, "offload", slot_total, statistics.median(times["offload"]), t_d2h, "pinned D2H copy_")
            )
            records.append(
                _record(name, "resume", slot_total, statistics.median(times["resume"]), t_h2d, "pinned H2D copy_")
            )
        manager.close()
    if rank == 0:
        out.extend(records)
        path = pathlib.Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name(0).replace(" ", "_") if gpu else "cpu-gloo"
        meta = {"date": datetime.date.today().isoformat(), "card": card, "backend": args.backend, "slots": args.slots}
        if gpu:  # a CPU smoke run writes nothing: its times are not the point
            file = path / f"parcel-{card}-{meta['date']}.json"
            file.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
            print("wrote", file)
        for r in records:
            print(json.dumps(r))
    dist.barrier()
    dist.destroy_process_group()


def _record(config: str, op: str, nbytes: int, seconds: float, ceiling_seconds: float, ceiling: str) -> dict:
    return {
        "config": config,
        "op": op,
        "bytes": nbytes,
        "us": round(seconds * 1e6, 1),
        "gbps": round(nbytes / seconds / 1e9, 2),
        "ceiling": ceiling,
        "ceiling_us": round(ceiling_seconds * 1e6, 1),
        "ratio_to_ceiling": round(ceiling_seconds / seconds, 3),
    }


def main() -> None:
    """Parse the arguments and spawn the two ranks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="mid,large")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.backend == "gloo":
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args, []), nprocs=2, join=True)


if __name__ == "__main__":
    main()
