"""Validate, then time, the converting MTP commit against the copy ceiling of the same GPU.

    python benchmarks/precision_bench.py [--configs mid,large] [--out benchmarks/results]

Needs a CUDA GPU and PyTorch (for the ceiling and the event timing, shared with run.py). For the
mid and large configs of benchmarks/run.py it builds three dtype variants of the cache:

    fp32 main <- bf16 per-step, nearest even   (widening: an exact conversion)
    bf16 main <- fp32 per-step, nearest even   (narrowing)
    bf16 main <- fp32 per-step, stochastic     (narrowing; one Philox4x32-10 call per 4 elements)
    fp16 main <- fp32 per-step, nearest / stochastic, and fp32 main <- fp16 per-step

and for each one

1. validates ``scatter_mtp_states`` on the GPU against the NumPy reference, bit for bit, every pool
   (2 layers, the config's slot sizes and accept pattern, random values);
2. times it with CUDA events (median of repeats, behind a sleep kernel, as run.py does) and divides
   the bytes it must move (per committed row and layer: the per-step slot read plus the main slot
   written, both kinds) by the time;
3. compares that with an eager device-to-device copy of the same byte count measured in this run,
   and with the word-copy commit of the equal-dtype cache.

Targets: nearest even >= 0.9 of the copy ceiling, stochastic >= 0.85. Writes
``<out>/precision-<card>-<date>.json``.

8-bit states (issue #26; ``--only 8bit`` runs just these): both main pools 8-bit, with their
float32 scales, committed by the Numba backend's ``commit8`` launch from wider per-step states
(``verify_writes_main_pool=False``, so a full accept commits too), and the plain 8-bit scatter
(8-bit per-step states: values and scales copied), and the Mamba2 replay commit into an 8-bit
recurrent state. Each is validated against the NumPy reference before it is timed (bit for bit,
every pool with the scales and residuals; a replayed recurrent state within one quantisation step);
its bytes are what the commit must move (``moved_bytes_8bit``). Targets: >= 0.85 of the copy ceiling for the converting
commits, >= 0.95 for the plain 8-bit scatter.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from numba import cuda  # noqa: E402

from benchmarks.run import CONFIGS, copy_gbps, device_time_us  # noqa: E402
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402

VARIANTS = {
    "fp32<-bf16 nearest": dict(main="float32", inter="bfloat16", stochastic=False, target=0.9),
    "bf16<-fp32 nearest": dict(main="bfloat16", inter="float32", stochastic=False, target=0.9),
    "bf16<-fp32 stochastic": dict(main="bfloat16", inter="float32", stochastic=True, target=0.85),
    "fp16<-fp32 nearest": dict(main="float16", inter="float32", stochastic=False, target=0.9),
    "fp16<-fp32 stochastic": dict(main="float16", inter="float32", stochastic=True, target=0.85),
    "fp32<-fp16 nearest": dict(main="float32", inter="float16", stochastic=False, target=0.9),
}
POOLS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")
#: The 8-bit variants: main dtype, per-step dtype (None: the main one), rounding, error feedback, target.
VARIANTS_8BIT = {
    "e4m3<-fp32 nearest": dict(main="float8_e4m3fn", inter="float32", stochastic=False, target=0.85),
    "e4m3<-fp32 stochastic": dict(main="float8_e4m3fn", inter="float32", stochastic=True, target=0.85),
    "e5m2<-bf16 nearest": dict(main="float8_e5m2", inter="bfloat16", stochastic=False, target=0.85),
    "int8<-fp32 nearest": dict(main="int8", inter="float32", stochastic=False, target=0.85),
    "int8<-fp32 stochastic+feedback": dict(main="int8", inter="float32", stochastic=True, feedback=True, target=0.85),
    "e4m3 plain scatter": dict(main="float8_e4m3fn", inter=None, stochastic=False, target=0.95),
    "int8 replay stochastic+feedback": dict(
        main="int8", inter=None, stochastic=True, feedback=True, replay=True, conv="float8_e4m3fn", target=0.85
    ),
    "e4m3 replay, bf16 conv": dict(
        main="float8_e4m3fn", inter=None, stochastic=False, replay=True, conv="bfloat16", target=0.85
    ),
}


def variant(config: Config, main: str, inter: str, stochastic: bool, **_) -> Config:
    return dataclasses.replace(
        config,
        recurrent_state_dtype=main,
        conv_state_dtype=main,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=12345,
    )


def moved_bytes(config: Config, accept: list[int]) -> int:
    """Bytes the commit must read and write: per committed row and layer, both kinds."""
    rows = sum(1 for a in accept if 1 <= a < config.max_intermediate_seq_len)
    per_row = config.recurrent_slot_elems * (
        config.recurrent_state_dtype.itemsize + config.intermediate_recurrent_state_dtype.itemsize
    ) + config.conv_slot_elems * (config.conv_state_dtype.itemsize + config.intermediate_conv_state_dtype.itemsize)
    return rows * per_row * config.num_recurrent_layers


def fill(managers, rng) -> None:
    for pool in POOLS:
        host = getattr(managers[0]._pools, pool)
        values = rng.uniform(-4, 4, host.shape).astype(host.dtype)
        for manager in managers:
            target = getattr(manager._pools, pool)
            if isinstance(target, np.ndarray):
                target[...] = values
            else:
                target.copy_to_device(np.ascontiguousarray(values).view(target.dtype))


def validate(config: Config, accept: list[int], rng) -> None:
    small = dataclasses.replace(config, num_recurrent_layers=2)
    ref, gpu = NumpyMambaCacheManager(small), NumbaMambaCacheManager(small)
    fill([ref, gpu], rng)
    positions = rng.integers(0, 100_000, len(accept)).astype(np.int32)
    host_accept = np.array(accept, np.int32)
    ref.scatter_mtp_states(host_accept, positions=positions)
    gpu.scatter_mtp_states(cuda.to_device(host_accept), positions=cuda.to_device(positions))
    cuda.synchronize()
    for pool in POOLS:
        want = np.ascontiguousarray(getattr(ref._pools, pool))
        got = getattr(gpu._pools, pool).copy_to_host()
        if want.tobytes() != got.tobytes():
            raise AssertionError(f"{small.recurrent_state_dtype} <- {small.intermediate_recurrent_state_dtype}: {pool}")


def variant_8bit(
    config: Config,
    main: str,
    inter: str | None,
    stochastic: bool,
    feedback: bool = False,
    replay: bool = False,
    conv: str | None = None,
    **_,
) -> Config:
    plain = inter is None
    return dataclasses.replace(
        config,
        commit_mode="replay" if replay else "scatter",
        recurrent_state_dtype=main,
        conv_state_dtype=conv or main,
        intermediate_recurrent_state_dtype=None if plain else inter,
        intermediate_conv_state_dtype=None if plain else inter,
        verify_writes_main_pool=plain,
        stochastic_rounding=stochastic,
        rounding_seed=12345,
        error_feedback=feedback,
    )


def moved_bytes_8bit(config: Config, accept: list[int]) -> int:
    """Bytes an 8-bit commit must read and write, per committed row and layer.

    Recurrent: the per-step state read, the 8-bit state and its scales written (error feedback: the
    bfloat16 residual read and written). Conv: the new columns read from the per-step window, the
    kept columns read, every column and its scales written (a plain 8-bit scatter: the window and its
    scales read and written).
    """
    seq, width = config.max_intermediate_seq_len, config.conv_kernel
    if config.commit_mode == "replay":
        return _replay_bytes_8bit(config, accept)
    max_accept = seq - 1 if config.verify_writes_main_pool else seq
    groups = config.recurrent_state_num_heads * config.recurrent_state_head_dim
    blocks, channels = config.conv_scale_blocks, config.conv_dim
    inter_rec, inter_conv = config.intermediate_recurrent_state_dtype, config.intermediate_conv_state_dtype
    total = 0
    for a in accept:
        if not 1 <= a <= max_accept:
            continue
        rec = config.recurrent_slot_elems * (inter_rec.itemsize + 1) + groups * 4 * (
            2 if inter_rec.itemsize == 1 else 1
        )
        if config.error_feedback:
            rec += config.recurrent_slot_elems * 4
        if inter_conv.itemsize == 1:  # plain: the window and its scales, read and written
            conv = 2 * (channels * width + blocks * width * 4)
        else:
            new = min(a, width)
            conv = channels * (new * inter_conv.itemsize + (width - new) + width) + blocks * 4 * (2 * width - new)
        total += (rec + conv) * config.num_recurrent_layers
    return total


def _replay_bytes_8bit(config: Config, accept: list[int]) -> int:
    """Bytes a replay into an 8-bit recurrent state must move, per committed row and layer.

    The state and its scales read and written (error feedback: the residual too), the stash of each
    accepted step read (its float32 fields and the conv column with its scales), the conv window's
    kept columns read and every column (and scales, when 8-bit) written.
    """
    groups = config.recurrent_state_num_heads * config.recurrent_state_head_dim
    esz, width, blocks = config.conv_state_dtype.itemsize, config.conv_kernel, config.conv_scale_blocks
    per_step = config.stash_step_bytes
    total = 0
    for a in accept:
        if not 1 <= a <= config.max_intermediate_seq_len:
            continue
        rec = 2 * (config.recurrent_slot_elems + groups * 4)
        if config.error_feedback:
            rec += config.recurrent_slot_elems * 4
        kept = max(width - a, 0)
        conv = config.conv_dim * esz * (kept + width) + (blocks * 4 * (kept + width) if esz == 1 else 0)
        total += (rec + a * per_step + conv) * config.num_recurrent_layers
    return total


def validate_8bit(config: Config, accept: list[int], rng) -> None:
    """The 8-bit commit on the GPU against the NumPy reference, bit for bit: every pool, scales and residuals."""
    from mamba_cache.precision import quant8

    small = dataclasses.replace(config, num_recurrent_layers=2)
    ref, gpu = NumpyMambaCacheManager(small), NumbaMambaCacheManager(small)
    pools = {name: getattr(ref._pools, name) for name in POOLS} | ref._scales
    pools = {name: host for name, host in pools.items() if host is not None}  # replay: no per-step states
    for name, host in pools.items():
        if name.startswith("scales_"):
            host[...] = rng.uniform(1e-3, 1.0, host.shape)
        elif host.dtype.itemsize == 1:
            host[...] = quant8.quantise(rng.uniform(-4, 4, host.shape).astype(np.float32), host.dtype).values
        else:
            host[...] = (rng.uniform(-4, 4, host.shape) * (1e-3 if name.startswith("residual") else 1)).astype(
                host.dtype
            )
        target = getattr(gpu._pools, name) if name in POOLS else gpu._scales[name]
        target.copy_to_device(np.ascontiguousarray(host).view(target.dtype))
    for name, host in ref._stash.items():  # replay mode: the stash, decays and inputs in (0.25, 1)
        if name == "conv":
            bits = np.dtype(f"u{host.dtype.itemsize}")
            values = rng.integers(0, 2 ** (8 * bits.itemsize), host.shape, dtype=bits).view(host.dtype)
        else:
            values = rng.uniform(0.25, 1.0, host.shape).astype(host.dtype)
        host[...] = values
        gpu._stash[name].copy_to_device(np.ascontiguousarray(values).view(gpu._stash[name].dtype))
    positions = rng.integers(0, 100_000, len(accept)).astype(np.int32)
    host_accept = np.array(accept, np.int32)
    replay = small.commit_mode == "replay"
    (ref.replay_mtp_states if replay else ref.scatter_mtp_states)(host_accept, positions=positions)
    (gpu.replay_mtp_states if replay else gpu.scatter_mtp_states)(
        cuda.to_device(host_accept), positions=cuda.to_device(positions)
    )
    cuda.synchronize()
    label = f"8-bit {small.recurrent_state_dtype} <- {small.intermediate_recurrent_state_dtype} ({small.commit_mode})"
    got = {n: (getattr(gpu._pools, n) if n in POOLS else gpu._scales[n]).copy_to_host() for n in pools}
    want = {n: np.ascontiguousarray(host) for n, host in pools.items()}
    if replay:  # the recurrent state within one quantisation step; everything else exact
        rec = ("recurrent", "scales_recurrent")
        stored = want["recurrent"].view(small.recurrent_state_dtype)
        if not quant8.within_one_step(got["recurrent"], got["scales_recurrent"], stored, want["scales_recurrent"]):
            raise AssertionError(f"{label}: recurrent state beyond one quantisation step")
        want = {n: v for n, v in want.items() if n not in (*rec, "residual_recurrent")}
    for name, host in want.items():
        if host.tobytes() != got[name].tobytes():
            raise AssertionError(f"{label}: {name}")


def time_commit(config: Config, accept: list[int], stream: torch.cuda.Stream) -> float:
    manager = NumbaMambaCacheManager(config, stream=stream)
    accept_dev = cuda.to_device(np.array(accept, np.int32))
    positions = cuda.to_device(np.arange(len(accept), dtype=np.int32) * 7)
    commit = manager.replay_mtp_states if config.commit_mode == "replay" else manager.scatter_mtp_states
    call = lambda: commit(accept_dev, stream, positions=positions)  # noqa: E731
    call()
    torch.cuda.synchronize()
    us = device_time_us([call], stream, 50)
    manager.close()
    return us


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="mid,large")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--only", choices=["all", "16bit", "8bit"], default="all", help="which variants to run")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    card = torch.cuda.get_device_name()
    stream = torch.cuda.Stream()
    records = []
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = out / f"precision-{card.replace(' ', '_')}-{date}.json"
    for name in args.configs.split(","):
        base, accept = CONFIGS[name]
        same = variant(base, "float32", "float32", False)
        copy_us = time_commit(same, accept, stream)
        variants = {} if args.only == "8bit" else {label: (spec, False) for label, spec in VARIANTS.items()}
        if args.only != "16bit":
            variants |= {label: (spec, True) for label, spec in VARIANTS_8BIT.items()}
        for label, (spec, eight) in variants.items():
            config = (variant_8bit if eight else variant)(base, **spec)
            (validate_8bit if eight else validate)(config, accept, rng)
            nbytes = (moved_bytes_8bit if eight else moved_bytes)(config, accept)
            us = time_commit(config, accept, stream)
            ceiling = copy_gbps(nbytes, stream)
            gbps = nbytes / us / 1e3
            record = {
                "config": name,
                "variant": label,
                "bytes": nbytes,
                "device_us": round(us, 2),
                "gbps": round(gbps, 1),
                "copy_ceiling_gbps": round(ceiling, 1),
                "ratio": round(gbps / ceiling, 3),
                "target": spec["target"],
                "meets_target": gbps / ceiling >= spec["target"],
                "fp32_word_copy_commit_us": round(copy_us, 2),
            }
            records.append(record)
            print(
                f"{name:<6} {label:<30} {us:>9.1f} us {gbps:>7.0f} GB/s  ceiling {ceiling:>6.0f}  "
                f"ratio {gbps / ceiling:.2f} (target {spec['target']})  fp32 copy commit {copy_us:.1f} us",
                flush=True,
            )
            # written after every row, so a run stopped by a time limit keeps what it measured
            path.write_text(json.dumps({"meta": {"card": card, "date": date}, "records": records}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["meets_target"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
