"""Fault cases run on the gloo processes of ``test_moving_processes.py`` (a module the spawned processes import).

``faults(rank, world, outdir)`` runs after the hand-offs, on ranks 0, 1 and 2: rank 0 sends rank 1
damaged parcels (a flipped byte, another model, another namespace, another dtype), which rank 1
must refuse with its slots untouched; then rank 2 starts sending rank 1 a parcel and dies after
the descriptor, and rank 1's ``recv_parcel`` must raise ``TransferError`` within its timeout. Every
process ends itself (``os._exit``): a group with a dead member cannot meet at a barrier.
"""

import json
import os
import time

import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.moving import ParcelError, StateParcel

TIMEOUT = 5.0


def config(**overrides) -> Config:
    fields = dict(
        num_recurrent_layers=2, max_batch_size=3, recurrent_state_num_heads=4, recurrent_state_head_dim=2,
        recurrent_state_size=3, conv_dim=4 * 2 + 2 * 2 * 3, conv_kernel=3, n_groups=2,
        recurrent_state_dtype="float32", conv_state_dtype="float32",
    )  # fmt: skip
    fields.update(overrides)
    return Config(**fields)


def filled(cfg: Config, seed: int) -> NumpyMambaCacheManager:
    manager = NumpyMambaCacheManager(cfg)
    rng = np.random.default_rng(seed)
    manager._pools.recurrent[...] = rng.standard_normal(manager._pools.recurrent.shape)
    manager._pools.conv[...] = rng.standard_normal(manager._pools.conv.shape)
    return manager


def flipped(parcel: StateParcel) -> StateParcel:
    descriptor, buffer = parcel.pieces[0]
    damaged = buffer.copy()
    damaged[damaged.size // 2] ^= np.uint8(0x04)
    return StateParcel(((descriptor, damaged),))


def faults(rank: int, world: int, outdir: str) -> None:
    import torch
    import torch.distributed as dist

    from mamba_cache.moving.transport import TransferError, recv_parcel, send_parcel

    slots = np.array([0, 2], np.int32)
    if rank == 0:
        source = filled(config(), 1)
        good = source.export_slots(slots, namespace="ns")
        bad = [
            ("flipped byte", flipped(good)),
            ("other model", filled(config(num_recurrent_layers=3), 2).export_slots(slots, namespace="ns")),
            ("other namespace", source.export_slots(slots, namespace="other")),
            ("other dtype", filled(config(conv_state_dtype="float16"), 3).export_slots(slots, namespace="ns")),
        ]
        for _, parcel in bad:
            send_parcel(parcel, 1)
        dist.recv(torch.zeros(1), 1)  # rank 1 is done reading
    elif rank == 1:
        target = filled(config(), 4)
        before = [p.copy() for p in (target.pools.recurrent, target.pools.conv)]
        results = {}
        for name in ("flipped byte", "other model", "other namespace", "other dtype"):
            parcel = recv_parcel(0, timeout=30)
            try:
                target.import_slots(parcel, slots, namespace="ns")
                results[name] = "imported"
            except ParcelError as error:
                results[name] = str(error)
        dist.send(torch.zeros(1), 0)
        start = time.perf_counter()
        try:
            recv_parcel(2, timeout=TIMEOUT)
            results["killed sender"] = "received"
        except TransferError as error:
            results["killed sender"] = str(error)
        results["killed sender seconds"] = time.perf_counter() - start
        after = (target.pools.recurrent, target.pools.conv)
        results["untouched"] = all(a.tobytes() == b.tobytes() for a, b in zip(before, after, strict=True))
        with open(os.path.join(outdir, "faults.json"), "w") as f:
            json.dump(results, f)
    elif rank == 2:
        from mamba_cache.moving import transport

        parcel = filled(config(), 5).export_slots(slots, namespace="ns")
        descriptor, buffer = parcel.pieces[0]
        header = np.frombuffer(descriptor.to_json(), dtype=np.uint8).copy()
        frame = torch.tensor([transport.MAGIC, 1, header.size, descriptor.nbytes], dtype=torch.int64)
        dist.send(frame, 1)
        dist.send(torch.from_numpy(header), 1)
        os._exit(0)  # killed mid-transfer: the buffer never comes
    os._exit(0)
