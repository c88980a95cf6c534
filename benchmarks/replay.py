"""Validate, then time, the replay commit against the scatter commit and the copy ceiling.

    python benchmarks/replay.py [--out benchmarks/results] [--skip-models]

Needs a CUDA GPU and PyTorch (the copy ceiling and the event timing come from benchmarks/run.py).
Two ops, both mixers:

``replay_commit``
    ``replay_mtp_states`` on a Nemotron-H-8B-like Mamba2 layer stack (its float16 state, and a
    bfloat16 row) and a Qwen3-Next-like Gated DeltaNet stack (batch 32, verify 4, mixed accept
    lengths), after validating it against the
    NumPy reference on 2 layers of the same sizes. Reported: device time; the ratio to the scatter
    commit of the same rows (``verify_writes_main_pool=False``: every accepted row copies a state;
    target <= 1.3); the device time of the first, one-element-per-thread kernels
    (the tests' oracle, ``tests/replay_oracle.py``, "first us") beside it; and the bytes it must move (state
    read + write, conv read + write, the accepted steps' stash) over that time, against an eager
    device-to-device copy of the same byte count measured in the same run (target >= 0.8).
``verify_plus_commit``
    The tiny models' verify pass + commit at realistic state sizes (2 layers): bytes the verify
    pass writes for the commit (per-step states vs stash; the replay-mode scratch states reported
    apart) and device time, scatter vs replay mode. The tiny models' kernels are not tuned: the
    bytes are the point, the times are indicative.

It prints one table and writes ``<out>/replay-<card>-<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the first replay kernels are the tests' oracle

import torch  # noqa: E402
from numba import cuda  # noqa: E402
from replay_oracle import prepare_first  # noqa: E402

from benchmarks.records import new_results_path  # noqa: E402
from benchmarks.run import copy_gbps, device_time_us  # noqa: E402
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.presets import PRESETS  # noqa: E402

BATCH, VERIFY = 32, 4
ACCEPT = [(1, 2, 3, 4, 2, 3, 4, 1)[i % 8] for i in range(BATCH)]
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}
#: The timed cases: (preset, recurrent state dtype override or None for the preset's own).
CASES = (("nemotron-h-8b", None), ("nemotron-h-8b", "bfloat16"), ("qwen3-next-80b-a3b", None))


def preset_config(name: str, layers: int | None = None, mode: str = "replay", dtype: str | None = None) -> Config:
    config = PRESETS[name].config(batch=BATCH, mtp=VERIFY, commit_mode=mode)
    if dtype is not None:
        config = dataclasses.replace(config, recurrent_state_dtype=dtype)
    if mode == "scatter":
        config = dataclasses.replace(config, verify_writes_main_pool=False)
    return config if layers is None else dataclasses.replace(config, num_recurrent_layers=layers)


def fill(manager, rng) -> dict:
    """Random realistic state and stash (decays in (0.5, 1), unit keys); returns the host values."""
    config = manager.get_config()
    values = {
        "recurrent": rng.standard_normal(manager._pools.recurrent.shape).astype(config.recurrent_state_dtype),
        "conv": rng.standard_normal(manager._pools.conv.shape).astype(config.conv_state_dtype),
    }
    for pool in ("recurrent", "conv"):
        device = getattr(manager._pools, pool)
        device.copy_to_device(values[pool].view(device.dtype))  # a bfloat16 pool holds uint16 raw bits
    for name, flat in manager._stash.items():
        shape = config.replay_stash_fields[name][0]
        value = rng.standard_normal((flat.shape[0], flat.shape[1] // int(np.prod(shape)), *shape))
        if name in ("dA", "g"):
            value = rng.uniform(0.5, 1.0, value.shape)
        if name == "beta":
            value = rng.uniform(0.0, 1.0, value.shape)
        if name == "k":
            value /= np.linalg.norm(value, axis=-1, keepdims=True)
        host = value.astype(flat.dtype).reshape(flat.shape)
        flat.copy_to_device(host)
        values[f"stash_{name}"] = host  # the stash field "conv" is not the conv pool
    return values


def validate(name: str, dtype: str | None, rng) -> None:
    config = preset_config(name, layers=2, dtype=dtype)
    device, reference = NumbaMambaCacheManager(config), NumpyMambaCacheManager(config)
    values = fill(device, rng)
    reference._pools.recurrent[...] = values["recurrent"]
    reference._pools.conv[...] = values["conv"]
    for field, flat in reference._stash.items():
        flat[...] = values[f"stash_{field}"]
    accept = np.array(ACCEPT, dtype=np.int32)
    accept[::7] = 0  # padding rows too
    device.replay_mtp_states(cuda.to_device(accept))
    reference.replay_mtp_states(accept)
    cuda.synchronize()
    for pool in ("recurrent", "conv"):
        want = getattr(reference._pools, pool)
        got = getattr(device._pools, pool).copy_to_host().view(want.dtype)
        tol = TOLERANCE[np.dtype(want.dtype).name]
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
        skipped = np.flatnonzero(accept == 0)
        assert got[:, skipped].tobytes() == values[pool][:, skipped].tobytes(), f"{name}: a padding row changed"
    label = f"{name} {config.recurrent_state_dtype.name}"
    print(f"  {label}: replay_mtp_states matches the NumPy reference (2 layers, batch {BATCH})", flush=True)


def moved_bytes(config: Config, accept: list[int]) -> int:
    """Bytes a replay commit must move: state + conv read and written, and the accepted steps' stash."""
    per_step = config.stash_step_bytes
    slot = config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
    slot += config.conv_slot_elems * config.conv_state_dtype.itemsize
    rows = [a for a in accept if 1 <= a <= config.max_intermediate_seq_len]
    return config.num_recurrent_layers * sum(2 * slot + a * per_step for a in rows)


def bench_commit(name: str, dtype: str | None, stream, rng) -> dict:
    replay_cfg, scatter_cfg = preset_config(name, dtype=dtype), preset_config(name, mode="scatter", dtype=dtype)
    accept = cuda.to_device(np.array(ACCEPT, dtype=np.int32))
    replay = NumbaMambaCacheManager(replay_cfg, stream=stream)
    fill(replay, rng)
    replay_us = device_time_us([lambda: replay.replay_mtp_states(accept, stream=stream)], stream, 50)
    scatter = NumbaMambaCacheManager(scatter_cfg, stream=stream)
    scatter_us = device_time_us([lambda: scatter.scatter_mtp_states(accept, stream=stream)], stream, 50)
    # the one-element-per-thread kernels (the tests' oracle), for comparison
    first = NumbaMambaCacheManager(replay_cfg, stream=stream, replay_kernels=prepare_first)
    fill(first, rng)
    first.replay_mtp_states(accept, stream=stream)
    first_us = device_time_us([lambda: first.replay_mtp_states(accept, stream=stream)], stream, 10)
    nbytes = moved_bytes(replay_cfg, ACCEPT)
    ceiling = copy_gbps(nbytes, stream)
    gbps = nbytes / replay_us / 1e3
    return {
        "op": "replay_commit",
        "preset": name,
        "mixer": replay_cfg.mixer,
        "state_dtype": replay_cfg.recurrent_state_dtype.name,
        "batch": BATCH,
        "verify": VERIFY,
        "accept": ACCEPT,
        "device_us": round(replay_us, 2),
        "scatter_device_us": round(scatter_us, 2),
        "replay_over_scatter": round(replay_us / scatter_us, 3),
        "first_kernels_device_us": round(first_us, 2),
        "moved_bytes": nbytes,
        "moved_gbps": round(gbps, 1),
        "copy_ceiling_gbps": round(ceiling, 1),
        "ratio_to_ceiling": round(gbps / ceiling, 3),
    }


def model_config(mixer: str, mode: str) -> Config:
    """2 layers at realistic state sizes (Nemotron-H-8B heads / Qwen3-Next heads), batch 8, verify 4."""
    if mixer == "mamba2":  # TinyMamba2 has one group: conv = H*D + 2N
        fields = dict(recurrent_state_num_heads=128, recurrent_state_head_dim=64, recurrent_state_size=128)
        fields.update(conv_dim=128 * 64 + 2 * 128, n_groups=1)
    else:
        fields = dict(recurrent_state_num_heads=32, recurrent_state_head_dim=128, recurrent_state_size=128)
        fields.update(conv_dim=2 * 16 * 128 + 32 * 128, n_groups=16)
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=8,
        conv_kernel=4,
        max_intermediate_seq_len=VERIFY,
        mixer=mixer,
        commit_mode=mode,
        **fields,
    )
    return dataclasses.replace(config, verify_writes_main_pool=False) if mode == "scatter" else config


def bench_models(stream, rng) -> list[dict]:
    from mamba_cache.models.gdn import TinyGatedDeltaNet
    from mamba_cache.models.mamba2 import TinyMamba2

    records = []
    for mixer, model_class in (("mamba2", TinyMamba2), ("gdn", TinyGatedDeltaNet)):
        drafts = rng.integers(0, 64, size=(8, VERIFY))
        accept = cuda.to_device(np.array([1, 2, 3, 4, 4, 3, 2, 1], dtype=np.int32))
        for mode in ("scatter", "replay"):
            config = model_config(mixer, mode)
            model = model_class(config, vocab_size=64, seed=0)
            cache = NumbaMambaCacheManager(config)
            commit = cache.replay_mtp_states if mode == "replay" else cache.scatter_mtp_states
            model.verify(cache, drafts)  # compile
            commit(accept)
            cuda.synchronize()
            start, end = cuda.event(), cuda.event()
            start.record()
            for _ in range(3):
                model.verify(cache, drafts)
                commit(accept)
            end.record()
            end.synchronize()
            pools = config.pool_bytes()
            written = pools["replay_stash"] if mode == "replay" else pools["intermediate_recurrent"]
            written += 0 if mode == "replay" else pools["intermediate_conv"]
            written = written * 8 // config.max_batch_size  # the 8 rows x V steps the pass writes
            records.append(
                {
                    "op": "verify_plus_commit",
                    "mixer": mixer,
                    "commit_mode": mode,
                    "rows": 8,
                    "verify": VERIFY,
                    "per_step_bytes_written": written,
                    "scratch_bytes": model.scratch_bytes(8) if mode == "replay" else 0,
                    "device_ms": round(cuda.event_elapsed_time(start, end) / 3, 3),
                }
            )
            print(f"  {mixer} {mode}: {records[-1]}", flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skip-models", action="store_true", help="time replay_commit only")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    card = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    for name, dtype in CASES:
        validate(name, dtype, rng)
    records = [bench_commit(name, dtype, stream, rng) for name, dtype in CASES]
    print(
        f"{'preset':<20} {'mixer':<7} {'dtype':<9} {'replay us':>10} {'scatter us':>11} {'ratio':>6} {'GB/s':>7}"
        f" {'ceiling':>8} {'x ceil':>7} {'first us':>9}"
    )
    for r in records:
        print(
            f"{r['preset']:<20} {r['mixer']:<7} {r['state_dtype']:<9} {r['device_us']:>10.1f}"
            f" {r['scatter_device_us']:>11.1f}"
            f" {r['replay_over_scatter']:>6.2f} {r['moved_gbps']:>7.0f} {r['copy_ceiling_gbps']:>8.0f}"
            f" {r['ratio_to_ceiling']:>7.2f} {r['first_kernels_device_us']:>9.1f}"
        )
    if not args.skip_models:
        records += bench_models(stream, rng)
    path = new_results_path(args.out, "replay", card)
    path.write_text(json.dumps({"card": card, "records": records}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
