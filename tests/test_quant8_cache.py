"""8-bit pools on the NumPy reference: commits, replay, moving slots, refusals, bytes (issue #26)."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from helpers import REFERENCE, assert_same_bits, golden_generator, snapshot

from mamba_cache import Config, ConfigError, NumpyMambaCacheManager
from mamba_cache.precision import quant8
from mamba_cache.precision.quant8 import QUANT8_DTYPE_NAMES, SLOT_SCALE_POOLS
from mamba_cache.replay.reference import gdn_step, mamba2_step

F32 = np.float32


def q8_config(dtype="int8", conv_dtype=None, **overrides) -> Config:
    """A small config with 8-bit pools: 70 conv channels (one full block of 64 and a short one), K = 3."""
    fields = dict(
        num_recurrent_layers=2,
        max_batch_size=5,
        recurrent_state_num_heads=2,
        recurrent_state_head_dim=3,
        recurrent_state_size=5,
        conv_dim=70,
        conv_kernel=3,
        max_intermediate_seq_len=3,
        recurrent_state_dtype=dtype,
        conv_state_dtype=conv_dtype or dtype,
        intermediate_recurrent_state_dtype="float32",
        intermediate_conv_state_dtype="bfloat16",
        verify_writes_main_pool=False,
    )
    fields.update(overrides)
    return Config(**fields)


def fill(manager, rng) -> None:
    """Realistic contents: float32 states quantised by the rule, small residuals, random per-step states."""
    config, pools, scales = manager.get_config(), manager._pools, manager._scales
    for kind in config.quantised_kinds:
        layout_shape = pools.recurrent.shape if kind == "recurrent" else pools.conv.shape
        x = (rng.standard_normal(layout_shape) * np.exp2(rng.integers(-8, 8, layout_shape[:-1] + (1,)))).astype(F32)
        stored = quant8.quantise(x, getattr(config, f"{kind}_state_dtype"), layout=kind)
        getattr(pools, kind)[...] = stored.values
        scales[f"scales_{kind}"][...] = stored.scales
    if "residual_recurrent" in scales:
        residual = scales["residual_recurrent"]
        residual[...] = (rng.standard_normal(residual.shape) * 1e-3).astype(residual.dtype)
    for kind in ("recurrent", "conv"):
        inter = getattr(pools, f"intermediate_{kind}")
        if inter is None:
            continue
        if inter.dtype.itemsize == 1:  # 8-bit per-step states: stored by the rule, with their scales
            per_slot = getattr(config, f"{kind}_state_shape")[1:]
            x = rng.standard_normal((inter.shape[0], inter.size // inter.shape[0] // np.prod(per_slot), *per_slot))
            stored = quant8.quantise(x.astype(F32), inter.dtype, layout=kind)
            inter[...] = stored.values.reshape(inter.shape)
            scales[f"scales_intermediate_{kind}"][...] = stored.scales.reshape(inter.shape[0], -1)
        else:
            inter[...] = rng.standard_normal(inter.shape).astype(inter.dtype)


def expected_window(old_values, old_scales, new, shift):
    """Columns j < K - s from the old window (bits and scales moved), the rest from ``new`` (stored now)."""
    width = old_values.shape[-1]
    values, scales = new.values.copy(), new.scales.copy()
    keep = width - shift
    if keep > 0:
        values[..., :keep], scales[..., :keep] = old_values[..., shift:], old_scales[..., shift:]
    return values, scales


@pytest.mark.parametrize("dtype", QUANT8_DTYPE_NAMES)
@pytest.mark.parametrize(("stochastic", "feedback"), [(False, False), (True, False), (True, True)])
def test_converting_scatter_quantises_the_accepted_step(rng, dtype, stochastic, feedback):
    config = q8_config(dtype, stochastic_rounding=stochastic, rounding_seed=2**33 + 5, error_feedback=feedback)
    manager = NumpyMambaCacheManager(config)
    fill(manager, rng)
    before = snapshot(manager)
    accept = np.array([1, 3, 0, -7, 2], np.int32)
    slots = np.array([4, 0, 1, 2, 3], np.int32)
    positions = rng.integers(0, 2**31 - 8, 5).astype(np.int32)
    manager.scatter_mtp_states(accept, state_indices=slots, positions=positions)
    after = snapshot(manager)
    expected = {name: array.copy() for name, array in before.items()}
    layers = np.arange(config.num_recurrent_layers)[:, None]
    inter_rec = before["intermediate_recurrent"].reshape(2, 5, 3, 2, 3, 5)
    inter_conv = before["intermediate_conv"].reshape(2, 5, 3, 70, 3)
    for row in np.flatnonzero((accept >= 1) & (accept <= 3)):
        a, slot, p = int(accept[row]), int(slots[row]), int(positions[row]) + int(accept[row])
        x = inter_rec[:, row, a - 1][:, None]  # [L, 1, H, D, N]
        residual = before["residual_recurrent"][:, slot : slot + 1] if feedback else None
        words = quant8.recurrent_rounding_bits(config.rounding_seed, layers, p, x.shape) if stochastic else None
        rec = quant8.quantise(x, dtype, random=words, residual=residual)
        expected["recurrent"][:, slot : slot + 1] = rec.values
        expected["scales_recurrent"][:, slot : slot + 1] = rec.scales
        if feedback:
            expected["residual_recurrent"][:, slot : slot + 1] = rec.residual
        window = inter_conv[:, row, a - 1][:, None].astype(F32)
        words = quant8.conv_rounding_bits(config.rounding_seed, layers, p, window.shape) if stochastic else None
        new = quant8.quantise(window, dtype, layout="conv", random=words)
        values, scales = expected_window(
            before["conv"][:, slot : slot + 1], before["scales_conv"][:, slot : slot + 1], new, a
        )
        expected["conv"][:, slot : slot + 1], expected["scales_conv"][:, slot : slot + 1] = values, scales
    assert_same_bits(after, expected, f"{dtype} stochastic={stochastic} feedback={feedback}")
    assert (after["recurrent"] != before["recurrent"]).any()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_plain_8bit_scatter_copies_values_and_scales(rng, dtype):
    config = q8_config(
        dtype, intermediate_recurrent_state_dtype=None, intermediate_conv_state_dtype=None, verify_writes_main_pool=True
    )
    manager = NumpyMambaCacheManager(config)
    fill(manager, rng)
    manager.reshape_intermediate_states(4, 3)
    before = snapshot(manager)
    manager.scatter_mtp_states(np.array([2, 0, 1, 3], np.int32))  # V = 3: a full accept (row 3) copies nothing
    after = snapshot(manager)
    expected = {name: array.copy() for name, array in before.items()}
    for row, a in ((0, 2), (2, 1)):  # the verify pass wrote [active = 4, V = 3, ...] from the buffers' start
        for name in ("recurrent", "conv", "scales_recurrent", "scales_conv"):
            per_slot = expected[name].shape[2:]
            flat = before[name.replace("_", "_intermediate_") if "_" in name else f"intermediate_{name}"]
            steps = flat[:, : 12 * int(np.prod(per_slot))].reshape(2, 12, *per_slot)
            expected[name][:, row] = steps[:, row * 3 + a - 1]
    assert_same_bits(after, expected, dtype)
    view = manager.get_intermediate_conv_scales(1)
    assert view.shape == (4, 3, 2, 3) and view.dtype == np.float32


def test_tree_commit_on_a_linear_path_equals_the_scatter(rng):
    config = q8_config("float8_e5m2", stochastic_rounding=True, error_feedback=True)
    managers = [NumpyMambaCacheManager(config) for _ in range(2)]
    state = np.random.default_rng(rng.integers(2**32))
    for manager in managers:
        fill(manager, np.random.default_rng(state.integers(1) + 7))
    accept = np.array([3, 1, 2, 0, 2], np.int32)
    positions = np.array([9, 0, 2**30, 4, 5], np.int32)
    managers[0].scatter_mtp_states(accept, positions=positions)
    nodes = np.tile(np.arange(3, dtype=np.int32), (5, 1))
    managers[1].scatter_accepted_tree_states(nodes, accept, positions=positions)
    assert_same_bits(snapshot(managers[0]), snapshot(managers[1]), "tree vs scatter")


def sequential_replay(config, recurrent, scales, residual, stash, accept, positions):
    """The decode loop, step by step: read ``stored * scale``, advance in float32, store by the rule."""
    layers = np.arange(config.num_recurrent_layers)[:, None]
    step = mamba2_step if config.mixer == "mamba2" else gdn_step
    names = ["dA", "u", "B"] if config.mixer == "mamba2" else ["g", "beta", "k", "v"]
    out_values, out_scales, out_residual = (
        recurrent.copy(),
        scales.copy(),
        None if residual is None else residual.copy(),
    )
    for row, a in enumerate(accept):
        if not 1 <= a <= config.max_intermediate_seq_len:
            continue
        values, group_scales = recurrent[:, row : row + 1], scales[:, row : row + 1]
        res = None if residual is None else residual[:, row : row + 1]
        for t in range(a):
            state = quant8.dequantise(values, group_scales[..., None])
            new = step(state, *(stash[name][:, row : row + 1, t] for name in names))
            words = None
            if config.stochastic_rounding:
                words = quant8.recurrent_rounding_bits(config.rounding_seed, layers, positions[row] + t + 1, new.shape)
            stored = quant8.quantise(new, config.recurrent_state_dtype, random=words, residual=res)
            values, group_scales, res = stored.values, stored.scales, stored.residual
        out_values[:, row : row + 1], out_scales[:, row : row + 1] = values, group_scales
        if res is not None:
            out_residual[:, row : row + 1] = res
    return out_values, out_scales, out_residual


@pytest.mark.parametrize(
    ("mixer", "dtype", "stochastic", "feedback"),
    [
        ("mamba2", "float8_e4m3fn", False, False),
        ("mamba2", "int8", True, True),
        ("gdn", "float8_e5m2", True, False),
        ("gdn", "int8", False, True),
    ],
)
def test_replay_into_8bit_equals_the_decode_loop(rng, mixer, dtype, stochastic, feedback):
    config = q8_config(
        dtype,
        commit_mode="replay",
        mixer=mixer,
        recurrent_state_head_dim=4,
        intermediate_recurrent_state_dtype=None,
        intermediate_conv_state_dtype=None,
        stochastic_rounding=stochastic,
        error_feedback=feedback,
    )
    manager = NumpyMambaCacheManager(config)
    fill(manager, rng)
    stash = {}
    for layer in range(config.num_recurrent_layers):
        for name, view in manager.get_replay_stash(layer).items():
            if name == "conv":
                view[...] = rng.integers(-127, 128, view.shape).astype(np.int8).view(np.uint8).view(view.dtype)
            elif name == "conv_scales":
                view[...] = rng.uniform(0.01, 2, view.shape)
            elif name in ("dA", "g", "beta"):
                view[...] = rng.uniform(0.5, 1, view.shape)
            else:
                view[...] = rng.standard_normal(view.shape)
    for name in manager.get_replay_stash(0):
        stash[name] = np.stack([manager.get_replay_stash(layer)[name] for layer in range(2)])
    before = snapshot(manager)
    accept = np.array([3, 0, 1, 2, 4], np.int32)  # 4 > V: untouched
    positions = rng.integers(0, 1000, 5).astype(np.int32)
    manager.replay_mtp_states(accept, positions=positions)
    after = snapshot(manager)
    values, scales, residual = sequential_replay(
        config,
        before["recurrent"],
        before["scales_recurrent"],
        before.get("residual_recurrent"),
        stash,
        accept,
        positions,
    )
    expected = dict(before, recurrent=values, scales_recurrent=scales)
    if feedback:
        expected["residual_recurrent"] = residual
    conv, conv_scales = before["conv"].copy(), before["scales_conv"].copy()
    for row, a in enumerate(accept):
        if 1 <= a <= 3:  # the last K columns of window ++ stashed columns, each with its scales
            full = np.concatenate([conv[:, row], np.swapaxes(stash["conv"][:, row, :a], -1, -2)], axis=-1)
            groups = np.concatenate([conv_scales[:, row], np.swapaxes(stash["conv_scales"][:, row, :a], -1, -2)], -1)
            conv[:, row], conv_scales[:, row] = full[..., -3:], groups[..., -3:]
    expected.update(conv=conv, scales_conv=conv_scales)
    assert_same_bits(after, expected, f"{mixer} {dtype}")
    assert (after["recurrent"] != before["recurrent"]).any()


def test_slots_move_with_their_scales_and_residuals(rng):
    config = q8_config("int8", "float8_e4m3fn", error_feedback=True)
    manager = NumpyMambaCacheManager(config)
    fill(manager, rng)
    before = snapshot(manager)
    manager.copy_slots(np.array([1, 3, 7], np.int32), np.array([0, 4, 2], np.int32))  # 7: padding, skipped
    after = snapshot(manager)
    for name in ("recurrent", "conv", "scales_recurrent", "scales_conv", "residual_recurrent"):
        expected = before[name].copy()
        expected[:, [0, 4]] = before[name][:, [1, 3]]
        assert after[name].tobytes() == expected.tobytes(), name
    captured = (manager.capture_recurrent_states(1), manager.capture_conv_states(1), manager.capture_scales(1))
    assert sorted(captured[2]) == ["residual_recurrent", "scales_conv", "scales_recurrent"]
    manager.clear_slot(1)
    cleared = snapshot(manager)
    assert all((cleared[name][:, 1] == 0).all() for name in captured[2])
    manager.restore_slot(1, list(captured[0]), list(captured[1]), scales=captured[2])
    assert_same_bits(snapshot(manager), after, "restore")
    manager.clear_states()
    assert all(not pool.any() for name, pool in snapshot(manager).items() if not name.startswith("intermediate"))


def test_restore_without_scales_is_refused_and_changes_nothing(rng):
    manager = NumpyMambaCacheManager(q8_config("float8_e4m3fn"))
    fill(manager, rng)
    rec, conv, scales = manager.capture_recurrent_states(0), manager.capture_conv_states(0), manager.capture_scales(0)
    before = snapshot(manager)
    with pytest.raises(ValueError, match="scales must be the dict capture_scales returns"):
        manager.restore_slot(2, list(rec), list(conv))
    with pytest.raises(ValueError, match="scales must have the keys"):
        manager.restore_slot(2, list(rec), list(conv), scales={"scales_recurrent": scales["scales_recurrent"]})
    with pytest.raises(ValueError, match=r"scales\['scales_conv'\] must have shape"):
        manager.restore_slot(2, list(rec), list(conv), scales=dict(scales, scales_conv=scales["scales_conv"][:, :, :1]))
    assert_same_bits(snapshot(manager), before, "refused restores")
    plain = NumpyMambaCacheManager(q8_config("float32", "float16", intermediate_conv_state_dtype=None))
    with pytest.raises(ValueError, match="None otherwise"):
        plain.restore_slot(0, [], [], scales={})


def test_stochastic_8bit_commit_requires_positions(rng):
    manager = NumpyMambaCacheManager(q8_config("int8", stochastic_rounding=True))
    fill(manager, rng)
    before = snapshot(manager)
    with pytest.raises(ValueError, match="positions .* is required"):
        manager.scatter_mtp_states(np.array([1, 1, 1, 1, 1], np.int32))
    assert_same_bits(snapshot(manager), before)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"recurrent_state_dtype": "float16", "error_feedback": True}, "error_feedback needs an 8-bit recurrent"),
        ({"intermediate_recurrent_state_dtype": "float8_e5m2"}, "may be 8-bit only when it equals"),
        ({"intermediate_recurrent_state_dtype": None, "error_feedback": True}, "error_feedback needs a wider"),
        ({"verify_writes_main_pool": True}, "verify_writes_main_pool must be False"),
    ],
)
def test_refused_8bit_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        q8_config("int8", **overrides)


def test_8bit_paths_not_built_yet_are_refused(tmp_path):
    from mamba_cache import NumbaMambaCacheManager
    from mamba_cache.prefix import PrefixStateCache

    # (the Gated DeltaNet replay commit into an 8-bit state is built: test_quant8_numba compares it with NumPy)
    conv_only = q8_config("float16", "int8", commit_mode="replay", intermediate_recurrent_state_dtype=None)
    with pytest.raises(
        ConfigError, match="commit_mode='replay' and a float16 recurrent state .8-bit conv only. are not"
    ):
        NumbaMambaCacheManager(conv_only)
    with pytest.raises(ConfigError, match="recurrent_state_size must be <= 256 for the Numba replay"):
        NumbaMambaCacheManager(q8_config("int8", commit_mode="replay", recurrent_state_size=257))
    mixed = q8_config("int8", "float16", intermediate_conv_state_dtype="float32")
    with pytest.raises(ConfigError, match="intermediate_conv_state_dtype must equal conv_state_dtype .float16."):
        NumbaMambaCacheManager(mixed)
    config = q8_config("float8_e4m3fn")
    manager = NumpyMambaCacheManager(config)
    store = PrefixStateCache(manager, entries=2, block_size=4)
    entries = [store.reserve(), store.reserve()]
    before = snapshot(manager) | {f"entry {i}": pool.copy() for i, pool in enumerate(store.entry_pools)}
    # (tracking into 8-bit entries is built: test_8bit_tracking_stores_the_slot_state_after_the_tracked_step;
    # a scatter's 8-bit entries are written before its commit, so its refusals come first)
    for indices, tracked, match in (
        (None, [entries[0]] * 5, "track_entries must be distinct"),
        ([0, 0, 1, 2, 3], [entries[0], entries[1], -1, -1, -1], "committing rows must name distinct slots"),
    ):
        with pytest.raises(ValueError, match=match):
            manager.scatter_mtp_states(
                np.ones(5, np.int32),
                state_indices=None if indices is None else np.array(indices, np.int32),
                store=store,
                track_entries=np.array(tracked, np.int32),
                track_steps=np.zeros(5, np.int32),
            )
        after = snapshot(manager) | {f"entry {i}": pool for i, pool in enumerate(store.entry_pools)}
        assert_same_bits(after, before, f"refused tracking: {match}")
    with pytest.raises(ValueError, match="has no residual recurrent"):
        manager.get_recurrent_residual(0)
    with pytest.raises(ValueError, match="has no scales recurrent"):
        NumpyMambaCacheManager(q8_config("float16", "int8")).get_recurrent_scales(0)


@pytest.mark.parametrize("mode", ["scatter", "replay"])
def test_allocated_bytes_match_the_accounting(mode):
    extra = {"intermediate_conv_state_dtype": None} if mode == "scatter" else {}
    config = q8_config("int8", "float8_e5m2", commit_mode=mode, error_feedback=True, **extra)
    manager = NumpyMambaCacheManager(config)
    arrays = [p for p in manager._pools if p is not None] + list(manager._stash.values())
    pools = config.pool_bytes()
    assert sum(a.nbytes for a in arrays) + sum(a.nbytes for a in manager._scales.values()) == config.total_bytes
    assert pools["error_feedback"] == manager._scales["residual_recurrent"].nbytes == 2 * 5 * 30 * 2
    assert pools["scales"] == sum(a.nbytes for n, a in manager._scales.items() if n.startswith("scales_"))
    assert config.capacity_slot_bytes == (config.total_bytes - pools["error_feedback"]) // 5
    assert manager._scales["residual_recurrent"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert dataclasses.replace(config, error_feedback=False).pool_bytes()["error_feedback"] == 0


def test_8bit_fold_golden_vectors():
    """The committed replay-into-8-bit cases: the reference reproduces them, and a manager loaded with them does."""
    generator = golden_generator()
    committed = np.load(REFERENCE / "quant8-folds.npz")
    fresh = generator.quant8_fold_vectors()
    assert sorted(committed.files) == sorted(fresh)
    assert all(committed[key].tobytes() == value.tobytes() for key, value in fresh.items())
    for name, (config, _, _) in generator.QUANT8_FOLDS.items():
        manager = NumpyMambaCacheManager(config)
        pools = {"recurrent": manager._pools.recurrent, "conv": manager._pools.conv} | manager._scales
        pools |= {f"stash_{field}": pool for field, pool in manager._stash.items()}
        for pool, target in pools.items():
            target[...] = committed[f"{name}/initial_{pool}"].view(target.dtype)
        accept = committed[f"{name}/accept"]
        manager.replay_mtp_states(accept, positions=committed[f"{name}/positions"])
        for pool, target in pools.items():
            assert target.tobytes() == committed[f"{name}/final_{pool}"].tobytes(), (name, pool)
        moved = committed[f"{name}/final_recurrent"] != committed[f"{name}/initial_recurrent"]
        assert moved[:, accept > 0].any() and not moved[:, accept <= 0].any()


@pytest.mark.parametrize("ring", [3, 5])
def test_checkpoint_folds_into_8bit_equal_the_replay_commit(rng, ring):
    """R = S folds at every commit; R > S folds later (or on materialize): the bits of the replay commit either way."""
    common = dict(intermediate_recurrent_state_dtype=None, intermediate_conv_state_dtype=None, stochastic_rounding=True)
    common |= dict(error_feedback=True, recurrent_state_head_dim=4)
    replay = NumpyMambaCacheManager(q8_config("int8", "float8_e4m3fn", commit_mode="replay", **common))
    checkpoint = NumpyMambaCacheManager(
        q8_config("int8", "float8_e4m3fn", commit_mode="checkpoint", history_len=ring, **common)
    )
    seed = int(rng.integers(2**31))
    for manager in (replay, checkpoint):
        fill(manager, np.random.default_rng(seed))
    positions = rng.integers(0, 1000, 5).astype(np.int32)
    checkpoint.set_positions(np.arange(5, dtype=np.int32), positions.astype(np.int64))
    for layer in range(2):
        stash, history = replay.get_replay_stash(layer), checkpoint.get_history(layer)
        for name, view in stash.items():
            if name == "conv":
                values = rng.integers(0, 256, view.shape, dtype=np.uint8).view(view.dtype)
            else:
                values = rng.uniform(0.25, 1.0, view.shape).astype(view.dtype)
            view[...] = values
            history[name][:, :3] = values  # ring steps 0 .. V - 1 of each slot (h = 0)
    accept = np.array([3, 1, 0, 2, 3], np.int32)
    replay.replay_mtp_states(accept, positions=positions)
    checkpoint.checkpoint_mtp_states(accept)
    checkpoint.materialize(np.arange(5, dtype=np.int32))
    assert_same_bits(snapshot(checkpoint), snapshot(replay), f"R = {ring}")
    folded = checkpoint.capture_scales(3)
    assert all(folded[name].tobytes() == replay.capture_scales(3)[name].tobytes() for name in folded)


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
@pytest.mark.parametrize("mode", ["scatter", "replay", "checkpoint"])
def test_8bit_tracking_stores_the_slot_state_after_the_tracked_step(rng, mode, mixer):
    """A tracked entry holds the state a commit of ``t + 1`` steps gives the slot: values, scales and residuals."""
    from mamba_cache.prefix import PrefixStateCache

    common = dict(mixer=mixer, stochastic_rounding=True, error_feedback=True, commit_mode=mode)
    if mode != "scatter":  # (scatter: float32 / bfloat16 per-step states, quantised by the commit)
        common |= dict(intermediate_recurrent_state_dtype=None, intermediate_conv_state_dtype=None)
    config = q8_config("int8", "float8_e4m3fn", **common, **({"history_len": 5} if mode == "checkpoint" else {}))
    tracking, committing = NumpyMambaCacheManager(config), NumpyMambaCacheManager(config)
    seed, positions = int(rng.integers(2**31)), rng.integers(0, 1000, 5).astype(np.int32)
    for manager in (tracking, committing):
        fill(manager, np.random.default_rng(seed))
        values = np.random.default_rng(seed + 1)
        for name, pool in {"checkpoint": manager._history, "replay": manager._stash}.get(mode, {}).items():
            bits = values.integers(0, 256, pool.shape, dtype=np.uint8).view(pool.dtype) if name == "conv" else None
            pool[...] = values.uniform(0.25, 1.0, pool.shape).astype(pool.dtype) if bits is None else bits
        if mode == "checkpoint":
            manager.set_positions(np.arange(5, dtype=np.int32), positions.astype(np.int64))
    initial = snapshot(tracking)
    store = PrefixStateCache(tracking, entries=4, block_size=4)
    entries = [store.reserve() for _ in range(4)]
    accept = np.array([3, 2, 0, 3, 1], np.int32)  # checkpoint mode (S = 3, R = 5): rows 0 and 3 fold
    steps = np.array([1, 0, 0, 2, -1], np.int32)  # rows 2 (a = 0) and 4 (t = -1) track nothing
    track = dict(store=store, track_entries=np.array([*entries[:2], entries[3], entries[2], entries[3]], np.int32))
    if mode == "scatter":
        tracking.scatter_mtp_states(accept, positions=positions, **track, track_steps=steps)
        committing.scatter_mtp_states(np.array([2, 1, 0, 3, 0], np.int32), positions=positions)
    elif mode == "replay":
        tracking.replay_mtp_states(accept, positions=positions, **track, track_steps=steps)
        committing.replay_mtp_states(np.array([2, 1, 0, 3, 0], np.int32), positions=positions)
    else:
        tracking.checkpoint_mtp_states(accept, **track, track_steps=steps)
        committing.checkpoint_mtp_states(np.array([2, 1, 0, 3, 0], np.int32))
        committing.materialize(np.arange(5, dtype=np.int32))
    names = ["recurrent", "conv", *(n for n in SLOT_SCALE_POOLS if n in tracking.scale_pools)]
    assert len(names) == len(store.entry_pools) == 5
    want = snapshot(committing)
    for row, entry in ((0, entries[0]), (1, entries[1]), (3, entries[2])):
        for name, pool in zip(names, store.entry_pools, strict=True):
            assert pool[:, entry].tobytes() == want[name][:, row].tobytes(), (row, name)
        assert store.entry_pools[0][:, entry].tobytes() != initial["recurrent"][:, row].tobytes()
    assert not any(pool[:, entries[3]].any() for pool in store.entry_pools)  # named only by rows that track nothing


def test_8bit_snapshots_round_trip_with_their_scales(rng, tmp_path):
    from mamba_cache.snapshot import SnapshotError, load_snapshot

    config = q8_config("float8_e5m2", "int8", error_feedback=True)
    source, target = NumpyMambaCacheManager(config), NumpyMambaCacheManager(config)
    fill(source, rng)
    source.save_slot(tmp_path / "slot.npz", 2)
    before = snapshot(target)
    target.load_slot(tmp_path / "slot.npz", 4)
    after = snapshot(target)
    for name, pool in snapshot(source).items():
        expected = before[name].copy()
        if not name.startswith("intermediate"):
            expected[:, 4] = pool[:, 2]
        assert after[name].tobytes() == expected.tobytes(), name
    assert sorted(load_snapshot(tmp_path / "slot.npz", config)[2]) == [
        "residual_recurrent",
        "scales_conv",
        "scales_recurrent",
    ]
    with pytest.raises(SnapshotError, match="saved with the scales"):
        load_snapshot(tmp_path / "slot.npz", q8_config("float8_e5m2", "int8"))


def test_prefix_store_keeps_8bit_entries_with_their_scales_on_both_tiers(rng):
    from mamba_cache.prefix import PrefixStateCache
    from mamba_cache.prefix.plan import entry_bytes

    config = q8_config("int8", "float8_e4m3fn", error_feedback=True)
    manager = NumpyMambaCacheManager(config)
    fill(manager, rng)
    store = PrefixStateCache(manager, entries=1, block_size=4, host_entries=2)
    assert store.nbytes == entry_bytes(config) == sum(p.nbytes for p in store._pools)
    original = snapshot(manager)
    first, second = list(range(8)), list(range(100, 108))
    store.insert(first, 0)
    store.insert(second, 1)  # the device tier holds one entry: the first goes to the host tier
    for tokens, source, target in ((first + [1], 0, 3), (second + [1], 1, 4)):
        handle = store.match(tokens)
        assert handle is not None and handle.length == 8 and bool(handle.host) == (source == 0)
        store.restore(handle, target)
        after = snapshot(manager)
        for name in ("recurrent", "conv", "scales_recurrent", "scales_conv", "residual_recurrent"):
            assert after[name][:, target].tobytes() == original[name][:, source].tobytes(), (name, target)


def test_checkpoint_mode_8bit_prefix_insert_stores_the_folded_state_and_scales(rng):
    """A slot with ring steps pending: its entry holds the folded state with its scales; the slot is unchanged."""
    from mamba_cache.prefix import PrefixStateCache

    common = dict(intermediate_recurrent_state_dtype=None, intermediate_conv_state_dtype=None, stochastic_rounding=True)
    common |= dict(error_feedback=True, recurrent_state_head_dim=4)
    manager = NumpyMambaCacheManager(
        q8_config("int8", "float8_e4m3fn", commit_mode="checkpoint", history_len=6, **common)
    )
    fill(manager, rng)
    manager.set_positions(np.arange(5, dtype=np.int32), np.full(5, 8, np.int64))
    for layer in range(2):
        for name, view in manager.get_history(layer).items():
            if name == "conv":
                view[...] = rng.integers(0, 256, view.shape, dtype=np.uint8).view(view.dtype)
            else:
                view[...] = rng.uniform(0.25, 1.0, view.shape).astype(view.dtype)
    manager.checkpoint_mtp_states(np.array([2, 0, 0, 0, 0], np.int32))  # slot 0: h = 2, no fold (2 + 3 <= 6)
    assert manager.history_lengths()[0] == 2
    want_state, want_scales = manager.current_state(0), manager.capture_scales(0)
    before = snapshot(manager)
    store = PrefixStateCache(manager, entries=2, block_size=5)
    store.insert(list(range(10)), 0)  # p0 + h = 10 tokens
    assert_same_bits(snapshot(manager), before, "the source slot changed")
    store.restore(store.match(list(range(11))), 3)
    for layer in range(2):
        assert manager.get_recurrent_state(layer)[3:4].tobytes() == want_state[0][layer].tobytes()
        assert manager.get_conv_state(layer)[3:4].tobytes() == want_state[1][layer].tobytes()
    got = manager.capture_scales(3)
    assert sorted(got) == sorted(want_scales)
    assert all(got[name].tobytes() == want_scales[name].tobytes() for name in got)
    assert manager.checkpoint_positions()[3] == 10 and manager.history_lengths()[3] == 0


def test_the_precision_page_example_runs(capsys):
    """docs/concepts/precision.md includes its 8-bit example from examples/quant8_pools.py: it must run."""
    import runpy

    runpy.run_path(str(REFERENCE.parent / "examples" / "quant8_pools.py"), run_name="__main__")
    assert "quantisation steps of the committed float32 state" in capsys.readouterr().out


def test_tiny_models_refuse_8bit_states():
    from mamba_cache.models.gdn import TinyGatedDeltaNet
    from mamba_cache.models.mamba2 import TinyMamba2

    with pytest.raises(ValueError, match="TinyMamba2 does not decode into 8-bit states"):
        TinyMamba2(q8_config("int8", "float16", conv_dim=2 * 3 + 2 * 5, intermediate_conv_state_dtype=None))
    gdn = q8_config("float8_e4m3fn", "float16", mixer="gdn", conv_dim=2 * 3 + 2 * 5, intermediate_conv_state_dtype=None)
    with pytest.raises(ValueError, match="TinyGatedDeltaNet stores float16 / float32 / float64 states"):
        TinyGatedDeltaNet(gdn)
