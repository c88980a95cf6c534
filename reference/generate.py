"""Regenerate the golden vectors in reference/ from the NumPy reference.

    python reference/generate.py [--out reference]

Each case is a small config, initial pools of fixed random bits, and a sequence of operations;
after every operation the expected contents of all four pools (and any captured arrays) are
recorded. The format is described in reference/README.md. Everything is deterministic (fixed
seeds), so running this again reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402
from mamba_cache.precision import convert, quant8  # noqa: E402
from mamba_cache.prefix import PrefixStateCache, block_digests, prefix_key, root_digest  # noqa: E402

POOLS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")
#: Config fields that place a shard in a tensor-parallel model (Config.shard): not recorded per case.
SHARD_FIELDS = ("tp_size", "tp_rank", "replicated_groups")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

CASES = {
    "linear-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=4,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=3,
            recurrent_state_size=4,
            conv_dim=5,
            conv_kernel=3,
            max_intermediate_seq_len=3,
        ),
        [
            ("reshape_intermediate_states", {"active_batch_size": 3, "seq_len": 3}),
            ("scatter_mtp_states", {"accept_lengths": [2, 3, 0]}),
            ("reshape_intermediate_states", {"active_batch_size": 4, "seq_len": 2}),
            ("scatter_mtp_states", {"accept_lengths": [1, INT32_MIN, 2, INT32_MAX]}),
            ("capture_recurrent_states", {"batch_idx": 1}),
            ("capture_conv_states", {"batch_idx": 3}),
            ("clear_states", {}),
        ],
    ),
    "indirection-readonly-fp32": (
        Config(
            num_recurrent_layers=3,
            max_batch_size=5,
            recurrent_state_num_heads=1,
            recurrent_state_head_dim=4,
            recurrent_state_size=5,
            conv_dim=6,
            conv_kernel=2,
            max_intermediate_seq_len=4,
            recurrent_state_dtype="float32",
            conv_state_dtype="float32",
            verify_writes_main_pool=False,
        ),
        [
            ("scatter_mtp_states", {"accept_lengths": [4, 1, 0, 3, 2], "state_indices": [2, 0, 1, 5, -1]}),
            ("reshape_intermediate_states", {"active_batch_size": 2, "seq_len": 3}),
            ("scatter_mtp_states", {"accept_lengths": [3, 2], "state_indices": [4, 3]}),
            ("clear_slot", {"slot": 0}),
        ],
    ),
    "tree-fp32-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=2,
            recurrent_state_size=3,
            conv_dim=4,
            conv_kernel=4,
            max_intermediate_seq_len=4,
            recurrent_state_dtype="float32",
        ),
        [
            (
                "scatter_accepted_tree_states",
                {"accepted_node_ids": [[0, 2, 3], [1, -1, -1], [3, 0, 9]], "accept_lengths": [3, 1, 2]},
            ),
            (
                "scatter_accepted_tree_states",
                {
                    "accepted_node_ids": [[-1, -1], [0, 1], [2, 2]],
                    "accept_lengths": [2, INT32_MIN, 5],
                    "state_indices": [1, 2, 0],
                },
            ),
        ],
    ),
    "slots-fp64": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=1,
            recurrent_state_head_dim=2,
            recurrent_state_size=2,
            conv_dim=3,
            conv_kernel=2,
            max_intermediate_seq_len=2,
            recurrent_state_dtype="float64",
            conv_state_dtype="float64",
        ),
        [
            ("capture_recurrent_states", {"batch_idx": 0}),
            ("capture_conv_states", {"batch_idx": 0}),
            ("restore_slot", {"slot": 2, "recurrent_states": "step0", "conv_states": "step1", "layers": [2, 1]}),
            ("clear_slot", {"slot": 1}),
        ],
    ),
    # Replay commits, one per mixer. Their initial state and stash are dyadic rationals chosen so
    # that every product and sum of the replay is exact in float32 (keys are unit vectors with
    # entries +-1/2): a fused and an unfused multiply-add then give the same bits, so every
    # backend must reproduce these files bit for bit.
    "replay-mamba2-fp32-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=4,
            recurrent_state_num_heads=4,
            recurrent_state_head_dim=2,
            recurrent_state_size=3,
            conv_dim=5,
            conv_kernel=3,
            max_intermediate_seq_len=3,
            recurrent_state_dtype="float32",
            commit_mode="replay",
            mixer="mamba2",
            n_groups=2,
        ),
        [
            ("replay_mtp_states", {"accept_lengths": [1, 3, 0, 2]}),
            ("reshape_intermediate_states", {"active_batch_size": 3, "seq_len": 2}),
            ("replay_mtp_states", {"accept_lengths": [2, INT32_MAX, 1], "state_indices": [3, 0, 4]}),
        ],
    ),
    "replay-gdn-fp32-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=4,
            recurrent_state_size=3,
            conv_dim=4,
            conv_kernel=2,
            max_intermediate_seq_len=3,
            recurrent_state_dtype="float32",
            commit_mode="replay",
            mixer="gdn",
            n_groups=1,
        ),
        [
            ("replay_mtp_states", {"accept_lengths": [3, INT32_MIN, 2]}),
            ("reshape_intermediate_states", {"active_batch_size": 2, "seq_len": 3}),
            ("replay_mtp_states", {"accept_lengths": [1, 3], "state_indices": [2, -1]}),
        ],
    ),
    "mixed-bf16-stochastic": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=1,
            recurrent_state_head_dim=3,
            recurrent_state_size=3,
            conv_dim=5,
            conv_kernel=2,
            max_intermediate_seq_len=3,
            recurrent_state_dtype="bfloat16",
            intermediate_recurrent_state_dtype="float32",
            conv_state_dtype="float16",
            intermediate_conv_state_dtype="bfloat16",
            stochastic_rounding=True,
            rounding_seed=2**33 + 17,
        ),
        [
            ("scatter_mtp_states", {"accept_lengths": [2, 1, 3], "positions": [7, 0, 100]}),
            (
                "scatter_accepted_tree_states",
                {"accepted_node_ids": [[0, 2], [1, -1], [-1, -1]], "accept_lengths": [2, 2, 1], "positions": [9, 3, 4]},
            ),
            ("capture_recurrent_states", {"batch_idx": 0}),
        ],
    ),
    "prefix-store-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=4,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=3,
            recurrent_state_size=3,
            conv_dim=5,
            conv_kernel=3,
            max_intermediate_seq_len=3,
        ),
        [
            ("copy_slots", {"src_slots": [0, 1, 9], "dst_slots": [2, 3, 0]}),
            ("prefix_store", {"entries": 2, "block_size": 3, "namespace": "golden"}),
            ("prefix_insert", {"tokens": [5, 6, 7], "slot": 2}),
            ("prefix_insert", {"tokens": [5, 6, 7, 8, 9, 10], "slot": 1}),
            ("prefix_match_restore", {"tokens": [5, 6, 7, 8, 9, 10, 11], "slot": 0}),
            ("prefix_insert", {"tokens": [1, 1, 1], "slot": 3}),
            ("prefix_match_restore", {"tokens": [5, 6, 7, 8, 9, 10, 1], "slot": 1}),
            ("prefix_reserve", {}),
            ("reshape_intermediate_states", {"active_batch_size": 3, "seq_len": 3}),
            (
                "scatter_mtp_states",
                {
                    "accept_lengths": [3, 2, 1],
                    "state_indices": [1, 2, 3],
                    "track_entries": [-1, 0, 5],
                    "track_steps": [-1, 1, 0],
                },
            ),
        ],
    ),
    # Checkpointed decoding, one case per mixer: the ring holds the same kind of dyadic values, the
    # counters start inside their bounds (0 <= h <= R - S), and each case commits rows that only count,
    # rows that fold (h + a + S > R), a padding row, then materializes.
    "checkpoint-mamba2-fp32-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=4,
            recurrent_state_num_heads=4,
            recurrent_state_head_dim=2,
            recurrent_state_size=3,
            conv_dim=5,
            conv_kernel=3,
            max_intermediate_seq_len=2,
            recurrent_state_dtype="float32",
            commit_mode="checkpoint",
            history_len=4,
            mixer="mamba2",
            n_groups=2,
        ),
        [
            ("checkpoint_mtp_states", {"accept_lengths": [1, 2, 0, 2]}),
            ("materialize", {"slots": [0, 2]}),
            ("reshape_intermediate_states", {"active_batch_size": 3, "seq_len": 1}),
            ("checkpoint_mtp_states", {"accept_lengths": [1, INT32_MAX, 1], "state_indices": [3, 0, 9]}),
        ],
    ),
    "checkpoint-gdn-fp32-fp16": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=4,
            recurrent_state_size=3,
            conv_dim=4,
            conv_kernel=2,
            max_intermediate_seq_len=2,
            recurrent_state_dtype="float32",
            commit_mode="checkpoint",
            history_len=3,
            mixer="gdn",
            n_groups=1,
        ),
        [
            ("checkpoint_mtp_states", {"accept_lengths": [2, INT32_MIN, 1]}),
            ("materialize", {"slots": [2, 1]}),
            ("checkpoint_mtp_states", {"accept_lengths": [1, 2, 2], "state_indices": [1, 2, 0]}),
        ],
    ),
}

#: The block-digest chain of prefix keys, for implementations in other languages.
KEY_CASE = {"namespace": "model/adapter-é", "block_size": 4, "tokens": [0, 1, -1, INT32_MAX, INT32_MIN, 7, 8, 9, 10]}


def pool_names(config: Config) -> list[str]:
    """The pools of a case: the four of scatter mode, or the main two and the stash fields (``stash_<name>``)."""
    if config.commit_mode == "replay":
        return ["recurrent", "conv", *(f"stash_{name}" for name in config.replay_stash_fields)]
    if config.commit_mode == "checkpoint":  # the ring's fields, then the counters h and p0
        ring = [f"history_{name}" for name in config.replay_stash_fields]
        return ["recurrent", "conv", *ring, "history_lengths", "checkpoint_positions"]
    return list(POOLS)


def pool_array(manager, pool: str):
    """The stacked array of ``pool`` (a name from :func:`pool_names`) in ``manager``."""
    if pool.startswith("stash_"):
        return manager._stash[pool[len("stash_") :]]
    if pool in ("history_lengths", "checkpoint_positions"):
        return getattr(manager, f"_{pool}")
    if pool.startswith("history_"):
        return manager._history[pool[len("history_") :]]
    return getattr(manager._pools, pool)


def dyadic_pools(config: Config, seed: int) -> dict[str, np.ndarray]:
    """Replay and checkpoint cases: values whose replay arithmetic is exact in float32 (see CASES)."""
    manager = NumpyMambaCacheManager(config)
    rng = np.random.default_rng(seed)
    pools = {}
    for pool in pool_names(config):
        target = pool_array(manager, pool)
        field = pool.split("_", 1)[-1]  # the stash / ring field
        if pool == "history_lengths":  # steps past the checkpoint: 0 <= h <= R - S
            values = rng.integers(0, config.history_len - config.max_intermediate_seq_len + 1, size=target.shape)
        elif pool == "checkpoint_positions":
            values = rng.integers(0, 100, size=target.shape)
        elif field in ("dA", "g"):
            values = rng.choice([0.5, 0.75, 1.0], size=target.shape)
        elif field == "beta":
            values = rng.choice([0.25, 0.5, 1.0], size=target.shape)
        elif field == "k":
            values = rng.choice([-0.5, 0.5], size=target.shape)  # D = 4: unit norm exactly
        else:
            values = rng.integers(-8, 9, size=target.shape) / 8
        pools[pool] = values.astype(target.dtype)
    return pools


def initial_pools(config: Config, seed: int) -> dict[str, np.ndarray]:
    """Random non-zero pools for ``config`` from ``seed`` (every byte of every pool filled)."""
    manager = NumpyMambaCacheManager(config)
    rng = np.random.default_rng(seed)
    pools = {}
    for pool in POOLS:
        target = getattr(manager._pools, pool)
        pools[pool] = rng.integers(1, 256, size=target.nbytes, dtype=np.uint8).view(target.dtype).reshape(target.shape)
    return pools


def apply(manager, op: str, args: dict, captured: dict, as_array=np.asarray):
    """Run one golden-vector step on ``manager``; return any captured arrays."""
    if op in ("capture_recurrent_states", "capture_conv_states"):
        return getattr(manager, op)(args["batch_idx"])
    if op == "prefix_store":
        captured["store"] = PrefixStateCache(manager, **args)
        return None
    if op == "prefix_insert":
        captured["store"].insert(args["tokens"], args["slot"])
        return None
    if op == "prefix_match_restore":
        captured["store"].restore(captured["store"].match(args["tokens"]), args["slot"])
        return None
    if op == "prefix_reserve":
        captured["store"].reserve()
        return None
    if op == "restore_slot":
        rec_layers, conv_layers = args["layers"]
        manager.restore_slot(
            args["slot"], captured[args["recurrent_states"]][:rec_layers], captured[args["conv_states"]][:conv_layers]
        )
        return None
    call = {k: (as_array(np.asarray(v, dtype=np.int32)) if isinstance(v, list) else v) for k, v in args.items()}
    if "track_entries" in args:
        call["store"] = captured["store"]
    getattr(manager, op)(**call)
    return None


def store_pools(captured: dict) -> dict[str, np.ndarray]:
    """The prefix store's entries of a case that built one (``{}`` otherwise), as host arrays."""
    store = captured.get("store")
    if store is None:
        return {}
    return {"store_recurrent": store._pools[0], "store_conv": store._pools[1]}


def key_vectors() -> dict:
    """The hash-chain case: its inputs, the hex digests ``d_1 .. d_n`` and the tail keys of every off-grid length."""
    tokens, bs, namespace = KEY_CASE["tokens"], KEY_CASE["block_size"], KEY_CASE["namespace"]
    digests = block_digests(tokens, bs, namespace)
    tails = {str(n): prefix_key(tokens[:n], bs, namespace).hex() for n in range(1, len(tokens) + 1) if n % bs}
    return {
        **KEY_CASE,
        "root": root_digest(namespace).hex(),
        "digests": [d.hex() for d in digests],
        "tails": tails,
    }


#: The 8-bit conversion vectors: the Philox seed, layers and token positions of their random words.
QUANT8_CASE = {"seed": 2**40 + 26, "layer": 3, "positions": [7, 2**31 + 5]}


def quant8_edge_groups() -> np.ndarray:
    """``[2, 1, 6, 16]`` float32 recurrent states (slots, heads, d, n: 6 groups a slot) with every edge pattern.

    Slot 0 holds the edges, one per group: a NaN, an infinity, zeros (signed), a group whose
    ``amax / qmax`` is below ``2**-126`` (so the scale floors, float32 subnormals inside), values at and
    past each dtype's ``qmax`` ratio (448, 57344, 127 times a power of two, and float32's largest), and
    mid-grid ties; slot 1 is random normal values spread over many octaves.
    """
    rng = np.random.default_rng(26)
    edges = np.zeros((6, 16), np.float32)
    edges[0] = rng.standard_normal(16)
    edges[0, 5] = np.nan
    edges[1] = rng.standard_normal(16)
    edges[1, 9] = -np.inf
    edges[2, ::2] = -0.0
    edges[3] = rng.standard_normal(16) * np.float32(2.0**-140)
    edges[3, 0] = np.float32(1e-45)  # the smallest float32 subnormal
    edges[4] = [448, -448, 57344, -57344, 127, -127, 464, 480, 61440, 3.4e38, -3.4e38, 1, 0.5, 2.5, 3.5, 15]
    edges[5] = np.arange(16, dtype=np.float32) * np.float32(0.5) - np.float32(4.25)  # halves: ties for int8
    spread = rng.standard_normal((6, 16)) * np.exp2(rng.integers(-60, 60, (6, 1)))
    return np.stack([edges, spread.astype(np.float32)])[:, None]  # [slot 2, head 1, d 6, n 16]


def quant8_vectors() -> dict[str, np.ndarray]:
    """Inputs and expected outputs of every 8-bit conversion (``reference/quant8-conversions.npz``)."""
    seed, layer, positions = QUANT8_CASE["seed"], QUANT8_CASE["layer"], np.array(QUANT8_CASE["positions"])
    rng = np.random.default_rng(2026)
    recurrent = quant8_edge_groups()
    conv = (rng.standard_normal((2, 70, 4)) * np.exp2(rng.integers(-20, 20, (2, 1, 4)))).astype(np.float32)
    conv[0, 66, 1] = np.nan  # one (block, column) group of slot 0 is NaN; block 0 of that column is not
    conv[1, :64, 2] = 0.0  # a zero group
    residual = {
        "recurrent": convert(rng.standard_normal(recurrent.shape).astype(np.float32) * 0.01, quant8.RESIDUAL_DTYPE),
        "conv": convert(rng.standard_normal(conv.shape).astype(np.float32) * 0.01, quant8.RESIDUAL_DTYPE),
    }
    words = {
        "recurrent": quant8.recurrent_rounding_bits(seed, layer, positions, recurrent.shape),
        "conv": quant8.conv_rounding_bits(seed, layer, positions, conv.shape),
    }
    arrays = {"recurrent_x": recurrent, "conv_x": conv}
    for layout in ("recurrent", "conv"):
        arrays[f"{layout}_random"] = words[layout]
        arrays[f"{layout}_residual"] = residual[layout].view(np.uint16)
    for name in quant8.QUANT8_DTYPE_NAMES:
        for layout, x in (("recurrent", recurrent), ("conv", conv)):
            for rounding in ("nearest", "stochastic"):
                random = words[layout] if rounding == "stochastic" else None
                plain = quant8.quantise(x, name, layout=layout, random=random)
                fed = quant8.quantise(x, name, layout=layout, random=random, residual=residual[layout])
                key = f"{name}_{layout}_{rounding}"
                arrays[f"{key}_values"] = plain.values.view(np.uint8)
                arrays[f"{key}_scales"] = plain.scales
                arrays[f"{key}_feedback_values"] = fed.values.view(np.uint8)
                arrays[f"{key}_feedback_scales"] = fed.scales
                arrays[f"{key}_feedback_residual"] = fed.residual.view(np.uint16)
    return arrays


#: The 8-bit fold cases (replay-mode commits into 8-bit states): name to (config, accept, positions).
QUANT8_FOLDS = {
    "mamba2-int8-feedback-stochastic": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=4,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=3,
            recurrent_state_size=8,
            conv_dim=70,
            conv_kernel=3,
            max_intermediate_seq_len=3,
            recurrent_state_dtype="int8",
            conv_state_dtype="float8_e4m3fn",
            commit_mode="replay",
            stochastic_rounding=True,
            rounding_seed=26,
            error_feedback=True,
        ),
        [3, 1, 0, 2],
        [100, 2**31 - 4, 7, 0],
    ),
    "gdn-e5m2-nearest": (
        Config(
            num_recurrent_layers=2,
            max_batch_size=3,
            recurrent_state_num_heads=2,
            recurrent_state_head_dim=4,
            recurrent_state_size=6,
            conv_dim=8,
            conv_kernel=4,
            max_intermediate_seq_len=2,
            recurrent_state_dtype="float8_e5m2",
            conv_state_dtype="int8",
            commit_mode="replay",
            mixer="gdn",
        ),
        [2, 3, 1],
        [0, 0, 0],
    ),
}


def quant8_fold_vectors() -> dict[str, np.ndarray]:
    """Every pool before and after one 8-bit replay commit per case (``reference/quant8-folds.npz``)."""
    arrays = {}
    for index, (name, (config, accept, positions)) in enumerate(QUANT8_FOLDS.items()):
        rng = np.random.default_rng(4000 + index)
        manager = NumpyMambaCacheManager(config)
        pools = {"recurrent": manager._pools.recurrent, "conv": manager._pools.conv}
        pools |= manager._scales | {f"stash_{field}": pool for field, pool in manager._stash.items()}
        for kind, shape in (("recurrent", config.recurrent_state_shape), ("conv", config.conv_state_shape)):
            x = rng.standard_normal((config.num_recurrent_layers, *shape)) * np.exp2(
                rng.integers(-6, 6, shape[:-1] + (1,))
            )
            stored = quant8.quantise(x.astype(np.float32), getattr(config, f"{kind}_state_dtype"), layout=kind)
            pools[kind][...], pools[f"scales_{kind}"][...] = stored.values, stored.scales
        if "residual_recurrent" in pools:
            pools["residual_recurrent"][...] = rng.standard_normal(pools["residual_recurrent"].shape) * 1e-3
        for field, pool in manager._stash.items():
            if field == "conv":
                pool[...] = rng.integers(0, 256, pool.shape, dtype=np.uint8).view(pool.dtype)
            elif field in ("dA", "g", "beta", "conv_scales"):
                pool[...] = rng.uniform(0.25, 1.0, pool.shape)
            else:
                pool[...] = rng.standard_normal(pool.shape)
        arrays |= {f"{name}/initial_{pool}": values.copy() for pool, values in pools.items()}
        accept_array = np.array(accept, np.int32)
        manager.replay_mtp_states(accept_array, positions=np.array(positions, np.int32))
        arrays |= {f"{name}/final_{pool}": values.copy() for pool, values in pools.items()}
        arrays[f"{name}/accept"], arrays[f"{name}/positions"] = accept_array, np.array(positions, np.int32)
    # .npy cannot name bfloat16 or the float8 types: their raw bits
    raw = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
    return {k: v.view(f"u{v.itemsize}") if v.dtype.name in raw else v for k, v in arrays.items()}


def build(out: pathlib.Path) -> dict:
    """Run every case on the NumPy reference, write its ``.npz`` into ``out``; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": "mamba_cache.golden", "version": 1, "pools": list(POOLS), "cases": []}
    for index, (name, (config, steps)) in enumerate(CASES.items()):
        manager = NumpyMambaCacheManager(config)
        arrays = {}
        pools = pool_names(config)
        fill = initial_pools if config.commit_mode == "scatter" else dyadic_pools
        for pool, values in fill(config, seed=1000 + index).items():
            pool_array(manager, pool)[...] = values
            arrays[f"initial_{pool}"] = values.copy()
        captured = {}
        for i, (op, args) in enumerate(steps):
            result = apply(manager, op, args, captured)
            if result is not None:
                captured[f"step{i}"] = result
                for layer, array in enumerate(result):
                    arrays[f"step{i}_captured_{layer}"] = array
            for pool in pools:
                arrays[f"step{i}_{pool}"] = pool_array(manager, pool).copy()
            for pool, values in store_pools(captured).items():
                arrays[f"step{i}_{pool}"] = values.copy()
        file = f"{name}.npz"
        # .npy cannot name bfloat16: such arrays are stored as uint16 raw bits (the manifest has the dtype)
        np.savez(out / file, **{k: v.view(np.uint16) if v.dtype.name == "bfloat16" else v for k, v in arrays.items()})
        # where a shard sits is no part of a case (every case is unsharded): the manifest leaves it out
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in SHARD_FIELDS}
        for field in fields:
            if field.endswith("_dtype"):
                fields[field] = fields[field].name
        case = {"name": name, "file": file, "config": fields, "steps": [{"op": op, "args": args} for op, args in steps]}
        if pools != list(POOLS):
            case["pools"] = pools
        manifest["cases"].append(case)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "prefix-keys.json").write_text(json.dumps(key_vectors(), indent=1, ensure_ascii=False) + "\n")
    np.savez(out / "quant8-conversions.npz", **quant8_vectors())
    np.savez(out / "quant8-folds.npz", **quant8_fold_vectors())
    return manifest


def main() -> int:
    """Regenerate (or ``--check``) the golden vectors; return the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    manifest = build(pathlib.Path(parser.parse_args().out))
    print(f"wrote {len(manifest['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
