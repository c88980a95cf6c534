"""Replay commit: the stash replaces the per-step states, and the commit recomputes the accepted steps.

The expected states come from an independent row-by-row loop over the step functions the tiny
models' decode steps call (``mamba_cache.replay.reference``), storing to the state dtype after
every step as a decode step does. On the NumPy backend replay must equal it bit for bit; the Numba
backend fuses its multiply-adds (``cuda.fma``) and its exp differs by an ulp, so across backends
the states agree within ``TOLERANCE`` (bit-exact GPU proofs against the GPU decode step are in
``test_replay_models.py``).
"""

import helpers
import numpy as np
import pytest
from helpers import BACKENDS, SIMULATOR_LONG, device_int32, replay_config, simulator_long, snapshot, to_host, write_pool
from numba import cuda  # a module global, which the simulator swaps for its own in kernels

from mamba_cache import Config
from mamba_cache._config import COMMIT_MODES
from mamba_cache.replay.reference import conv_after, gdn_step, mamba2_step

F32 = np.float32
DTYPES = ["float16", "float32", "float64"]
MIXERS = ["mamba2", "gdn"]
#: Numba vs NumPy, per state dtype (`helpers.REPLAY_TOLERANCE`, shared with checkpoint mode's folds).
TOLERANCE = helpers.REPLAY_TOLERANCE


def write(target, values):
    if isinstance(target, np.ndarray):
        target[...] = values
    else:
        target.copy_to_device(np.ascontiguousarray(values).view(target.dtype))  # bfloat16: the uint16 raw bits


def stash_values(config, rng):
    """Random, realistic stash contents, ``[L, B*S*elems]`` per field (`helpers.stash_values`)."""
    steps = config.max_batch_size * config.max_intermediate_seq_len
    return {
        name: value.reshape(config.num_recurrent_layers, -1)
        for name, value in helpers.stash_values(config, rng, (steps,)).items()
    }


def filled_pair(config, backend, rng, **options):
    """A manager (built with ``options``) with random main pools and stash, and host copies of what was written."""
    manager = BACKENDS[backend](config, **options)
    state = {
        "recurrent": rng.standard_normal(manager.pools.recurrent.shape).astype(config.recurrent_state_dtype),
        "conv": rng.standard_normal(manager.pools.conv.shape).astype(config.conv_state_dtype),
    }
    for pool, values in state.items():
        write_pool(manager, pool, values)
    stash = stash_values(config, rng)
    for name, values in stash.items():
        write(manager._stash[name], values)
    return manager, state, stash


def expected_after(config, state, stash, accept, indices, seq_len, paths=None):
    """The replay, row by row and step by step, from the step functions (``paths``: each row's steps)."""
    recurrent, conv = state["recurrent"].copy(), state["conv"].copy()
    layers, slots = recurrent.shape[:2]
    fields = config.replay_stash_fields
    names = ["dA", "u", "B"] if config.mixer == "mamba2" else ["g", "beta", "k", "v"]
    step_fn = mamba2_step if config.mixer == "mamba2" else gdn_step
    for row, accepted in enumerate(accept):
        slot = row if indices is None else indices[row]
        steps = list(range(accepted)) if paths is None else paths[row]
        if paths is not None:
            accepted = len(steps)
        if not (1 <= accepted <= seq_len and 0 <= slot < slots):
            continue
        for layer in range(layers):
            for t in steps:
                step = row * seq_len + t
                inputs = [stash[n][layer].reshape(-1, *fields[n][0])[step] for n in names]
                new = step_fn(recurrent[layer, slot].astype(F32), *inputs)
                recurrent[layer, slot] = new.astype(recurrent.dtype)
            columns = stash["conv"][layer].reshape(-1, config.conv_dim)[[row * seq_len + t for t in steps]]
            window = conv[layer, slot]
            for column in columns:  # shift in one column at a time, as a decode step does
                window = np.concatenate([window[:, 1:], column[:, None]], axis=1)
            conv[layer, slot] = window
    return {"recurrent": recurrent, "conv": conv}


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_indices", [False, True])
def test_replay_equals_stepwise_decoding(backend, rng, mixer, dtype, use_indices):
    config = replay_config(mixer, dtype)
    manager, state, stash = filled_pair(config, backend, rng)
    active, seq_len = 5, 3
    manager.reshape_intermediate_states(active, seq_len)
    # 0, 1, V, padding (<= 0, > V, INT32 extremes) and, with indices, slots out of range
    accept = np.array([0, 1, seq_len, 2, INT32_MIN], dtype=np.int32)
    indices = None
    if use_indices:
        accept = np.array([seq_len, 1, 2, seq_len + 1, 2], dtype=np.int32)
        indices = np.array([3, 0, 5, 1, -1], dtype=np.int32)  # rows 2 and 4 name slots outside [0, 5)
    manager.replay_mtp_states(
        device_int32(backend, accept), state_indices=None if indices is None else device_int32(backend, indices)
    )
    got = snapshot(manager)
    want = expected_after(config, state, stash, accept, indices, seq_len)
    touched = {int(r if indices is None else indices[r]) for r, a in enumerate(accept) if 1 <= a <= seq_len}
    touched &= set(range(config.max_batch_size))
    untouched = sorted(set(range(config.max_batch_size)) - touched)
    for kind in ("recurrent", "conv"):
        # conv windows only move values: bit-exact on every backend; so are the untouched slots
        assert got[kind][:, untouched].tobytes() == state[kind][:, untouched].tobytes(), kind
        if backend == "numpy" or kind == "conv":
            assert got[kind].tobytes() == want[kind].tobytes(), f"{kind} differs from the stepwise reference"
        else:
            np.testing.assert_allclose(got[kind].astype(np.float64), want[kind].astype(np.float64), **TOLERANCE[dtype])
        assert (got[kind][:, sorted(touched)] != state[kind][:, sorted(touched)]).any(), "the replay changed nothing"
    for name, values in stash.items():  # the commit never writes the stash
        assert to_host(manager._stash[name]).tobytes() == values.tobytes()


def test_a_replay_one_step_short_is_caught(rng):
    """The check above can fail: replaying a - 1 steps leaves other bits."""
    config = replay_config("gdn", "float32")
    manager, state, stash = filled_pair(config, "numpy", rng)
    manager.reshape_intermediate_states(5, 3)
    accept = np.array([2, 2, 2, 2, 2], dtype=np.int32)
    manager.replay_mtp_states(accept - 1)
    want = expected_after(config, state, stash, accept, None, 3)
    assert snapshot(manager)["recurrent"].tobytes() != want["recurrent"].tobytes()


def test_replay_mode_keeps_a_stash_instead_of_the_states(backend):
    config = replay_config("mamba2", "float16", verify_writes_main_pool=True)
    assert config.verify_writes_main_pool is False
    manager = BACKENDS[backend](config)
    assert not manager.has_intermediate_recurrent_states() and not manager.has_intermediate_conv_states()
    assert manager.has_replay_stash()
    for getter in (manager.get_intermediate_recurrent_state, manager.get_intermediate_conv_state):
        with pytest.raises(ValueError, match="replay"):
            getter(0)
    assert {k: v.shape for k, v in manager.get_replay_stash(1).items()} == {
        "dA": (5, 4, 4),
        "u": (5, 4, 4, 3),
        "B": (5, 4, 2, 5),
        "conv": (5, 4, 7),
    }
    manager.reshape_intermediate_states(3, 2)
    assert manager.intermediate_shape == (3, 2)
    stash = manager.get_replay_stash(0)
    assert {k: v.shape[:2] for k, v in stash.items()} == dict.fromkeys(stash, (3, 2))
    assert stash["conv"].dtype == np.float16 and stash["u"].dtype == np.float32
    # a prefix reinterpretation: element [1, 0] of the [3, 2] view is flat step 2 of the layer
    flat = to_host(manager._stash["dA"])[0].reshape(-1, 4)
    write(manager._stash["dA"], np.arange(flat.size * 2, dtype=np.float32).reshape(2, -1))
    assert to_host(manager.get_replay_stash(0)["dA"])[1, 0].tolist() == [8, 9, 10, 11]
    pools = sum(a.nbytes for a in manager._stash.values())
    assert pools == config.pool_bytes()["replay_stash"]
    accept = device_int32(backend, [1, 1, 1])
    with pytest.raises(ValueError, match="replay_mtp_states"):
        manager.scatter_mtp_states(accept)
    with pytest.raises(ValueError, match="replay_mtp_states"):
        manager.scatter_accepted_tree_states(device_int32(backend, [[0], [0], [0]]), accept)
    with pytest.raises(ValueError, match="store, track_entries and track_steps go together"):
        manager.replay_mtp_states(accept, track_entries=accept, track_steps=accept)


def test_scatter_mode_refuses_replay(backend):
    manager = BACKENDS[backend](replay_config(commit_mode="scatter"))
    with pytest.raises(ValueError, match="commit_mode='replay'"):
        manager.replay_mtp_states(device_int32(backend, [1]))
    with pytest.raises(ValueError, match="no replay stash"):
        manager.get_replay_stash(0)


def test_replay_without_a_stash_does_nothing(backend):
    manager = BACKENDS[backend](replay_config(max_intermediate_seq_len=0))
    before = snapshot(manager)
    manager.replay_mtp_states(device_int32(backend, [1, 2]))
    assert not manager.has_replay_stash()
    for pool, values in snapshot(manager).items():
        assert values.tobytes() == before[pool].tobytes()


@pytest.mark.parametrize(
    ("accept", "indices", "error", "match"),
    [
        ([1, 1, 1, 1, 1, 1], None, ValueError, "accept_lengths must have length in \\[0, 5\\]"),
        ([1, 1], [0, 0], ValueError, "distinct slots"),
        ([1, 1], [0], ValueError, "state_indices must have the length"),
        ([[1, 1]], None, ValueError, "1-D"),
    ],
)
def test_bad_replay_arguments_change_nothing(rng, accept, indices, error, match):
    config = replay_config("gdn", "float32")
    manager, _, _ = filled_pair(config, "numpy", rng)
    before = snapshot(manager)
    with pytest.raises(error, match=match):
        manager.replay_mtp_states(
            np.array(accept, dtype=np.int32), state_indices=None if indices is None else np.array(indices, np.int32)
        )
    for pool, values in snapshot(manager).items():
        assert values.tobytes() == before[pool].tobytes()
    with pytest.raises(TypeError, match="int32"):
        manager.replay_mtp_states(np.array([1], dtype=np.int64))


def test_conv_after_is_the_last_k_columns(rng):
    window = rng.standard_normal((2, 3, 4)).astype(F32)  # [R, C, K]
    columns = rng.standard_normal((2, 5, 3)).astype(F32)  # [R, V, C]
    got = conv_after(window, columns, np.array([0, 5]))
    assert got[0].tobytes() == window[0].tobytes()
    assert got[1].tobytes() == columns[1, 1:].T.copy().tobytes()


def test_stash_is_at_most_a_tenth_of_the_per_step_states_at_batch_32_verify_4():
    """The issue's target, from the published dims (bytes per row, draft step and layer)."""
    from fractions import Fraction

    from mamba_cache.presets import PRESETS

    by_hand = {
        # Nemotron-H-8B, fp16: state 128 x 64 x 128, conv (8192 + 2 x 8 x 128) x 4;
        # stash dA [128] + u [128, 64] + B [8, 128] float32 + conv column [10240] fp16
        "nemotron-h-8b": (128 * 64 * 128 * 2 + 10240 * 4 * 2, 128 * 4 + 128 * 64 * 4 + 8 * 128 * 4 + 10240 * 2),
        # Qwen3-Next, fp32 state 32 x 128 x 128, fp16 conv 8192 x 4;
        # stash g, beta [32] + k [16, 128] + v [32, 128] float32 + conv column [8192] fp16
        "qwen3-next-80b-a3b": (32 * 128 * 128 * 4 + 8192 * 4 * 2, 2 * 32 * 4 + 16 * 128 * 4 + 32 * 128 * 4 + 8192 * 2),
    }
    for name, (scatter_step, replay_step) in by_hand.items():
        preset = PRESETS[name]
        scatter, replay = (preset.config(batch=32, mtp=4, commit_mode=mode).pool_bytes() for mode in COMMIT_MODES[:2])
        rows = 32 * 4 * preset.num_recurrent_layers
        assert scatter["intermediate_recurrent"] + scatter["intermediate_conv"] == rows * scatter_step
        assert replay["replay_stash"] == rows * replay_step
        assert replay["intermediate_recurrent"] == replay["intermediate_conv"] == 0
        ratio = Fraction(replay["replay_stash"], scatter["intermediate_recurrent"] + scatter["intermediate_conv"])
        assert ratio == Fraction(replay_step, scatter_step) <= Fraction(1, 10), (name, float(ratio))


def test_presets_carry_their_mixer_and_groups():
    from mamba_cache.presets import PRESETS

    nemotron, qwen = PRESETS["nemotron-h-8b"].config(batch=1), PRESETS["qwen3-next-80b-a3b"].config(batch=1)
    assert (nemotron.mixer, nemotron.n_groups) == ("mamba2", 8)
    assert (qwen.mixer, qwen.n_groups) == ("gdn", 16)
    assert PRESETS["qwen3-next-80b-a3b"].config(batch=1, tp=4).n_groups == 4


def test_memory_table_and_plan_show_both_modes(capsys):
    from mamba_cache.cli import main

    table = replay_config(commit_mode="scatter").memory_table()
    assert "scatter (per-step states)" in table and "replay (per-step stash)" in table
    assert "replay (per-step stash)" not in replay_config(max_intermediate_seq_len=0).memory_table()
    assert main(["plan", "--preset", "qwen3-next-80b-a3b", "--batch", "32", "--mtp", "4"]) == 0
    out = capsys.readouterr().out
    assert "9.28 GiB" in out and "181.12 MiB" in out and "0.0191" in out


# ---------------------------------------------------------------- bad inputs (tests/test_bad_inputs.py style)
def _array(backend, values, dtype=np.int32):
    host = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    if backend == "numpy":
        return host
    from numba import cuda

    return cuda.to_device(host)


# (id, numpy only, call(manager, backend), exception, message regex)
REPLAY_BAD_CASES = [
    ("replay(list)", False, lambda m, b: m.replay_mtp_states([1, 1]), TypeError, "accept_lengths must be"),
    ("replay(int64)", False, lambda m, b: m.replay_mtp_states(_array(b, [1], np.int64)), TypeError, "int32"),
    (
        "replay(2-D)",
        False,
        lambda m, b: m.replay_mtp_states(_array(b, [[1]])),
        ValueError,
        "accept_lengths must be 1-D",
    ),
    (
        "replay(6 rows > B)",
        False,
        lambda m, b: m.replay_mtp_states(_array(b, [1] * 6)),
        ValueError,
        r"accept_lengths must have length in \[0, 5\]",
    ),
    (
        "replay(3 rows > view)",
        False,
        lambda m, b: (m.reshape_intermediate_states(2, 3), m.replay_mtp_states(_array(b, [1] * 3))),
        ValueError,
        r"accept_lengths must have length in \[0, 2\]",
    ),
    (
        "replay(indices too short)",
        False,
        lambda m, b: m.replay_mtp_states(_array(b, [1, 1]), state_indices=_array(b, [0])),
        ValueError,
        "state_indices must have the length of accept_lengths",
    ),
    (
        "replay(indices int64)",
        False,
        lambda m, b: m.replay_mtp_states(_array(b, [1]), state_indices=_array(b, [0], np.int64)),
        TypeError,
        "state_indices must have dtype int32",
    ),
    (
        "replay(track_entries)",
        False,
        lambda m, b: m.replay_mtp_states(_array(b, [1]), track_entries=_array(b, [0])),
        ValueError,
        "go together",
    ),
    (
        "replay(two rows, one slot)",
        True,
        lambda m, b: m.replay_mtp_states(_array(b, [1, 2]), state_indices=_array(b, [3, 3])),
        ValueError,
        "distinct slots",
    ),
    ("get_replay_stash(-1)", False, lambda m, b: m.get_replay_stash(-1), IndexError, r"must be in \[0, 2\)"),
    ("get_replay_stash(2)", False, lambda m, b: m.get_replay_stash(2), IndexError, r"must be in \[0, 2\)"),
    ("get_replay_stash('0')", False, lambda m, b: m.get_replay_stash("0"), TypeError, "must be an integer"),
    ("scatter in replay mode", False, lambda m, b: m.scatter_mtp_states(_array(b, [1])), ValueError, "replay_mtp"),
    (
        "tree in replay mode",
        False,
        lambda m, b: m.scatter_accepted_tree_states(_array(b, [[0]]), _array(b, [1])),
        ValueError,
        "replay_accepted_tree_states",
    ),
    (
        "tree replay(nodes rows)",
        False,
        lambda m, b: m.replay_accepted_tree_states(_array(b, [[0], [0]]), _array(b, [1])),
        ValueError,
        "accepted_node_ids must have len",
    ),
    (
        "tree replay(nodes 1-D)",
        False,
        lambda m, b: m.replay_accepted_tree_states(_array(b, [0]), _array(b, [1])),
        ValueError,
        "accepted_node_ids must be 2-D",
    ),
    ("per-step state in replay mode", False, lambda m, b: m.get_intermediate_conv_state(0), ValueError, "stash"),
]


def _all_bits(manager) -> dict:
    bits = snapshot(manager)
    bits.update({f"stash_{name}": to_host(flat) for name, flat in manager._stash.items()})
    return bits


@pytest.mark.parametrize(
    ("case_id", "numpy_only", "call", "exc", "msg"), REPLAY_BAD_CASES, ids=[c[0] for c in REPLAY_BAD_CASES]
)
@pytest.mark.parametrize("mixer", MIXERS)
def test_bad_replay_input_is_refused_and_changes_nothing(backend, rng, mixer, case_id, numpy_only, call, exc, msg):
    if numpy_only and backend != "numpy":
        pytest.skip("the GPU gives no defined winner; only the checked NumPy reference refuses")
    manager, _, _ = filled_pair(replay_config(mixer, "float16"), backend, rng)
    before = _all_bits(manager)
    with pytest.raises(exc, match=msg):
        call(manager, backend)
    after = _all_bits(manager)
    for pool in before:
        assert after[pool].tobytes() == before[pool].tobytes(), (case_id, pool)


@pytest.mark.parametrize("how", ["closed", "moved from"])
def test_a_closed_replay_manager_refuses(backend, how):
    manager = BACKENDS[backend](replay_config())
    other = manager.move() if how == "moved from" else manager.close()
    with pytest.raises(ValueError, match="closed or moved from"):
        manager.replay_mtp_states(_array(backend, [1]))
    with pytest.raises(ValueError, match="closed or moved from"):
        manager.get_replay_stash(0)
    assert not manager.has_replay_stash()
    if other is not None:
        assert other.has_replay_stash()


def test_numba_refuses_a_key_dim_its_replay_kernel_cannot_hold():
    from mamba_cache import ConfigError
    from mamba_cache.core.numba_backend import NumbaMambaCacheManager

    with pytest.raises(ConfigError, match="must be <= 256"):
        NumbaMambaCacheManager(replay_config("gdn", recurrent_state_head_dim=257))


@pytest.mark.parametrize("mixer", MIXERS)
def test_gpu_replay_captures_into_a_cuda_graph(rng, mixer):
    """Captured on a user's stream with accept_lengths on the device, replayed with new values."""
    from helpers import ON_GPU

    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine)")
    from cuda.bindings import driver
    from numba import cuda

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    config = replay_config(mixer, "float32")
    dev, state, stash = filled_pair(config, "numba", rng)
    stream = cuda.stream()
    acc = cuda.to_device(np.zeros(5, dtype=np.int32), stream=stream)
    dev.reshape_intermediate_states(5, 3)
    dev.replay_mtp_states(acc, stream=stream)  # the first call prepares the launch outside capture
    stream.synchronize()
    handle = int(stream.handle)
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    dev.replay_mtp_states(acc, stream=stream)
    exec_graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    values = np.array([3, 0, 1, 2, -4], dtype=np.int32)
    acc.copy_to_device(values, stream=stream)
    check(driver.cuGraphLaunch(exec_graph, handle))
    stream.synchronize()
    want = expected_after(config, state, stash, values, None, 3)
    got = snapshot(dev)
    assert got["conv"].tobytes() == want["conv"].tobytes()
    np.testing.assert_allclose(got["recurrent"], want["recurrent"], **TOLERANCE["float32"])
    assert (got["recurrent"][:, 0] != state["recurrent"][:, 0]).any()


@simulator_long(backend="numba", mixer="gdn", dtype="float32")
@simulator_long(backend="numba", mixer="gdn", dtype="float64")
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_replay_follows_each_accepted_path(backend, rng, mixer, dtype):
    """Tree verification in replay mode: each row replays its accepted path of node ids, in order."""
    config = replay_config(mixer, dtype)
    manager, state, stash = filled_pair(config, backend, rng)
    manager.reshape_intermediate_states(5, 3)
    nodes = np.array([[0, 2, 1], [1, -1, -1], [2, 5, 0], [0, 1, 2], [2, 0, 1]], dtype=np.int32)
    accept = np.array([3, 1, 2, 0, INT32_MAX], dtype=np.int32)
    indices = np.array([4, 0, 1, 2, 3], dtype=np.int32)
    # row 2's path holds node 5 >= V and row 3 accepted nothing: both skipped (slots 1 and 2 untouched)
    paths = [[0, 2, 1], [1], [], [], [2, 0, 1]]
    manager.replay_accepted_tree_states(
        device_int32(backend, nodes), device_int32(backend, accept), device_int32(backend, indices)
    )
    got = snapshot(manager)
    want = expected_after(config, state, stash, accept, indices, 3, paths=paths)
    for kind in ("recurrent", "conv"):
        assert got[kind][:, [1, 2]].tobytes() == state[kind][:, [1, 2]].tobytes(), kind
        if backend == "numpy" or kind == "conv":
            assert got[kind].tobytes() == want[kind].tobytes(), kind
        else:
            np.testing.assert_allclose(got[kind].astype(np.float64), want[kind].astype(np.float64), **TOLERANCE[dtype])
        assert (got[kind][:, [0, 3, 4]] != state[kind][:, [0, 3, 4]]).all(axis=tuple(range(2, state[kind].ndim))).any()
    # a path that is a prefix 0, 1, .. is the linear replay
    other, _, _ = filled_pair(config, backend, np.random.default_rng(5))
    linear, _, _ = filled_pair(config, backend, np.random.default_rng(5))
    for m in (other, linear):
        m.reshape_intermediate_states(5, 3)
    other.replay_accepted_tree_states(
        device_int32(backend, np.tile(np.arange(3, dtype=np.int32), (5, 1))), device_int32(backend, [1, 2, 3, 0, 2])
    )
    linear.replay_mtp_states(device_int32(backend, [1, 2, 3, 0, 2]))
    same = {k: v.tobytes() for k, v in snapshot(other).items()} == {k: v.tobytes() for k, v in snapshot(linear).items()}
    assert same, "a path 0, 1, .. must be the linear replay"


def test_tree_replay_in_scatter_mode_is_refused():
    manager = BACKENDS["numpy"](replay_config(commit_mode="scatter"))
    with pytest.raises(ValueError, match="commit_mode='replay'"):
        manager.replay_accepted_tree_states(np.zeros((1, 1), np.int32), np.ones(1, np.int32))


# ---------------------------------------------------------------- rounding, tracking, PTX (issue 11 follow-up)
def model_config(dtype, mixer="mamba2", batch=4, verify=3, **overrides):
    """A tiny model's replay-mode config (Mamba2: 2 heads x 4 x 8; GDN: 4 value heads, 2 key heads, D=8, N=4)."""
    if mixer == "gdn":
        dims = dict(recurrent_state_num_heads=4, recurrent_state_head_dim=8, recurrent_state_size=4, n_groups=2)
        dims["conv_dim"] = 2 * 2 * 8 + 4 * 4
    else:
        dims = dict(recurrent_state_num_heads=2, recurrent_state_head_dim=4, recurrent_state_size=8, n_groups=1)
        dims["conv_dim"] = 2 * 4 + 2 * 8
    fields = dict(
        num_recurrent_layers=2,
        max_batch_size=batch,
        conv_kernel=4,
        max_intermediate_seq_len=verify,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode="replay",
        mixer=mixer,
        **dims,
    )
    fields.update(overrides)
    return Config(**fields)


def tiny_model(config, rng, vocab=32):
    from mamba_cache.models.gdn import TinyGatedDeltaNet
    from mamba_cache.models.mamba2 import TinyMamba2

    model_class = TinyMamba2 if config.mixer == "mamba2" else TinyGatedDeltaNet
    return model_class(config, vocab_size=vocab, seed=int(rng.integers(1 << 30)))


def main_bits(manager):
    pools = snapshot(manager)
    return {k: pools[k].tobytes() for k in ("recurrent", "conv")}


#: (state dtype, stochastic rounding): every way a replay rounds a 16-bit state after each step.
ROUNDINGS = [("bfloat16", False), ("float16", True), ("bfloat16", True)]


@simulator_long(backend="numba", dtype="float16", stochastic=True)  # bfloat16-sr covers the stochastic path there
@simulator_long(backend="numba", dtype="bfloat16", stochastic=False)  # the tiled-kernel bfloat16 cases cover it there
@pytest.mark.parametrize(("dtype", "stochastic"), ROUNDINGS, ids=[f"{d}-{'sr' if s else 'rne'}" for d, s in ROUNDINGS])
def test_replay_rounds_16_bit_states_as_the_decode_step_does(backend, rng, dtype, stochastic):
    """TinyMamba2, bf16 / stochastic rounding: verify + replay == sequential decode of the accepted tokens."""
    config = model_config(dtype, stochastic_rounding=stochastic, rounding_seed=0x1234_5678_9ABC)
    model = tiny_model(config, rng)
    spec, seq = BACKENDS[backend](config), BACKENDS[backend](config)
    active, verify = 4, config.max_intermediate_seq_len
    prompt = rng.integers(0, 32, size=(active, 3))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    consumed = np.full(active, 3, dtype=np.int32)
    for accept in ([0, 1, verify, 2], [verify, verify, 1, 0], [2, 0, 1, verify]):
        drafts = rng.integers(0, 32, size=(active, verify))
        model.verify(spec, drafts, positions=consumed)
        spec.replay_mtp_states(device_int32(backend, accept), positions=device_int32(backend, consumed))
        model.decode_accepted(seq, drafts, accept, positions=consumed)
        assert main_bits(spec) == main_bits(seq), f"{backend} {dtype} sr={stochastic} after {accept}"
        consumed = consumed + np.maximum(np.array(accept, dtype=np.int32), 0)
    assert np.abs(snapshot(spec)["recurrent"].astype(np.float64)).sum() > 0


@simulator_long(backend="numba", dtype="float16")  # bfloat16 covers the keying on the simulator
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_replay_is_keyed_by_the_position(backend, rng, dtype):
    """The check above can fail: the same replay keyed one token later leaves other bits."""
    config = model_config(dtype, stochastic_rounding=True, rounding_seed=7)
    model = tiny_model(config, rng)
    caches = [BACKENDS[backend](config) for _ in range(2)]
    prompt = rng.integers(0, 32, size=(4, 2))
    drafts = rng.integers(0, 32, size=(4, 3))
    for shift, cache in enumerate(caches):
        model.prefill(cache, prompt)
        model.verify(cache, drafts, positions=np.full(4, 2))
        cache.replay_mtp_states(device_int32(backend, [3, 3, 3, 3]), positions=device_int32(backend, [2 + shift] * 4))
    assert main_bits(caches[0])["recurrent"] != main_bits(caches[1])["recurrent"]
    assert main_bits(caches[0])["conv"] == main_bits(caches[1])["conv"]  # conv columns are copied, not rounded


def test_stochastic_replay_needs_positions(backend, rng):
    config = model_config("float16", stochastic_rounding=True)
    manager = BACKENDS[backend](config)
    manager.reshape_intermediate_states(2, 3)
    before = main_bits(manager)
    for call in (
        lambda: manager.replay_mtp_states(device_int32(backend, [1, 2])),
        lambda: manager.replay_accepted_tree_states(device_int32(backend, [[0], [0]]), device_int32(backend, [1, 1])),
    ):
        with pytest.raises(ValueError, match="positions"):
            call()
    with pytest.raises(ValueError, match="positions must have the length"):
        manager.replay_mtp_states(device_int32(backend, [1, 2]), positions=device_int32(backend, [0]))
    assert main_bits(manager) == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_numpy_replay_of_bfloat16_and_stochastic_states_matches_the_stepwise_reference(rng, mixer, dtype):
    """The reference's rounding after every step, checked against an independent row-by-row loop."""
    from mamba_cache.precision import convert

    config = replay_config(mixer, dtype, stochastic_rounding=True, rounding_seed=99)
    manager, state, stash = filled_pair(config, "numpy", rng)
    manager.reshape_intermediate_states(5, 3)
    accept = np.array([3, 1, 0, 2, 3], dtype=np.int32)
    positions = np.array([5, 0, 9, 17, 1000], dtype=np.int32)
    manager.replay_mtp_states(accept, positions=positions)
    want = state["recurrent"].copy()
    fields = config.replay_stash_fields
    names = ["dA", "u", "B"] if mixer == "mamba2" else ["g", "beta", "k", "v"]
    step_fn = mamba2_step if mixer == "mamba2" else gdn_step
    for row, a in enumerate(accept):
        for layer in range(2):
            for t in range(a):
                inputs = [stash[n][layer].reshape(-1, *fields[n][0])[row * 3 + t] for n in names]
                new = step_fn(want[layer, row].astype(F32), *inputs)
                want[layer, row] = convert(
                    new.reshape(1, -1),
                    want.dtype,
                    stochastic=True,
                    seed=99,
                    layer=layer,
                    position=positions[row] + t + 1,
                ).reshape(new.shape)
    assert snapshot(manager)["recurrent"].tobytes() == want.tobytes()


def test_replay_tracking_restores_a_prefix_that_decodes_to_the_same_bits(backend, rng):
    """TinyMamba2 in replay mode: checkpoints tracked by the replay commit restore to whole-prompt bits."""
    from mamba_cache.prefix import PrefixStateCache

    config, bs, verify = model_config("float16", batch=3), 4, 3
    model = tiny_model(config, rng)
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=8, block_size=bs)
    active = 2
    prompt = rng.integers(0, 32, size=(active, 3))
    model.prefill(cache, prompt)
    history = [list(row) for row in prompt]
    published = 0
    for _ in range(4):
        drafts = rng.integers(0, 32, size=(active, verify))
        accept = rng.integers(1, verify + 1, size=active)
        entries, steps = helpers.track_next_boundaries(store, history, bs, verify)
        model.verify(cache, drafts)
        cache.replay_mtp_states(
            device_int32(backend, accept),
            store=store,
            track_entries=device_int32(backend, entries),
            track_steps=device_int32(backend, steps),
        )
        published += helpers.publish_tracked(store, history, drafts, accept, entries, steps)
    assert published >= 2
    for b in range(active):
        tokens = np.array(history[b] + [int(rng.integers(0, 32))])
        handle = store.match(tokens)
        assert handle is not None and handle.length == (len(tokens) - 1) // bs * bs
        store.restore(handle, slot=2)
        out = np.stack([to_host(model.decode_step(cache, [t], slots=[2]))[0] for t in tokens[handle.length :]])
        plain = BACKENDS[backend](config)
        want = np.stack([to_host(model.decode_step(plain, [t], slots=[2]))[0] for t in tokens])[handle.length :]
        assert out.tobytes() == want.tobytes(), b
        got_bits, want_bits = snapshot(cache), snapshot(plain)
        for kind in ("recurrent", "conv"):
            assert got_bits[kind][:, 2].tobytes() == want_bits[kind][:, 2].tobytes(), (b, kind)


@pytest.mark.parametrize("mixer", MIXERS)
def test_replay_tracking_copies_the_state_after_the_step_and_refuses_bad_entries(backend, rng, mixer):
    """Entry e gets the state after step t (t < a, committing rows only); untouched entries stay; bad sets refused."""
    from mamba_cache.prefix import PrefixStateCache

    config = replay_config(mixer, "float16")
    manager, state, stash = filled_pair(config, backend, rng)
    store = PrefixStateCache(manager, entries=6, block_size=4)
    reserved = [store.reserve() for _ in range(5)]
    manager.reshape_intermediate_states(5, 3)
    accept = np.array([3, 2, 0, 3, 1], dtype=np.int32)
    steps = np.array([1, 2, 0, 0, 0], dtype=np.int32)  # row 1: t = a (nothing); row 2 commits nothing
    entries = np.array(reserved, dtype=np.int32)
    entries[4] = 6  # outside [0, P): nothing
    if backend == "numpy":  # the checked reference refuses a repeated entry before anything moves
        before = main_bits(manager)
        with pytest.raises(ValueError):
            manager.replay_mtp_states(
                accept, store=store, track_entries=np.array([reserved[0]] * 5, np.int32), track_steps=steps
            )
        assert main_bits(manager) == before
    manager.replay_mtp_states(
        device_int32(backend, accept),
        store=store,
        track_entries=device_int32(backend, entries),
        track_steps=device_int32(backend, steps),
    )
    entry_rec, entry_conv = (to_host(pool) for pool in store.entry_pools)
    for row, t in ((0, 1), (3, 0)):  # the state after step t is the replay of t + 1 steps
        partial = expected_after(config, state, stash, [t + 1 if r == row else 0 for r in range(5)], None, 3)
        got_rec = entry_rec[:, entries[row]].astype(np.float64)
        if backend == "numpy":
            assert entry_rec[:, entries[row]].tobytes() == partial["recurrent"][:, row].tobytes(), row
        else:
            np.testing.assert_allclose(got_rec, partial["recurrent"][:, row].astype(np.float64), **TOLERANCE["float16"])
        assert entry_conv[:, entries[row]].tobytes() == partial["conv"][:, row].tobytes(), row
    for row in (1, 2):  # tracked nothing: the entries are still zero
        assert not entry_rec[:, entries[row]].any() and not entry_conv[:, entries[row]].any(), row
    want = expected_after(config, state, stash, accept, None, 3)
    assert snapshot(manager)["conv"].tobytes() == want["conv"].tobytes()


@pytest.mark.parametrize(("dtype", "stochastic"), ROUNDINGS, ids=[f"{d}-{'sr' if s else 'rne'}" for d, s in ROUNDINGS])
def test_gpu_rounded_replay_equals_the_gpu_decode_step_at_real_head_sizes(rng, dtype, stochastic):
    """On the GPU: Mamba2 heads of 64 x 128, bf16 / stochastic rounding: replay kernel == decode kernels, bitwise."""
    from helpers import ON_GPU

    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine): the simulator is too slow at these sizes")
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=6,
        recurrent_state_num_heads=8,
        recurrent_state_head_dim=64,
        recurrent_state_size=128,
        conv_dim=8 * 64 + 2 * 128,
        conv_kernel=4,
        max_intermediate_seq_len=4,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode="replay",
        stochastic_rounding=stochastic,
        rounding_seed=2026,
    )
    model = tiny_model(config, rng, vocab=64)
    spec, seq = BACKENDS["numba"](config), BACKENDS["numba"](config)
    prompt = rng.integers(0, 64, size=(6, 2))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    consumed = np.full(6, 2, dtype=np.int32)
    for accept in ([4, 1, 0, 3, 2, 4], [2, 4, 1, 0, 4, 3]):
        drafts = rng.integers(0, 64, size=(6, 4))
        model.verify(spec, drafts, positions=consumed)
        spec.replay_mtp_states(device_int32("numba", accept), positions=device_int32("numba", consumed))
        model.decode_accepted(seq, drafts, accept, positions=consumed)
        consumed = consumed + np.array(accept, dtype=np.int32)
    assert main_bits(spec) == main_bits(seq), f"{dtype} sr={stochastic}"


@pytest.mark.parametrize("mixer", MIXERS)
def test_gpu_tracked_stochastic_replay_captures_into_a_cuda_graph(rng, mixer):
    """positions + tracking bound on device arrays, captured once, replayed with new values == NumPy reference."""
    from helpers import ON_GPU

    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine)")
    from cuda.bindings import driver
    from numba import cuda

    from mamba_cache.prefix import PrefixStateCache

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    config = replay_config(mixer, "bfloat16", stochastic_rounding=True, rounding_seed=5)
    seed = int(rng.integers(1 << 30))
    dev, _, _ = filled_pair(config, "numba", np.random.default_rng(seed))
    ref, _, _ = filled_pair(config, "numpy", np.random.default_rng(seed))
    stores = [PrefixStateCache(m, entries=5, block_size=4) for m in (dev, ref)]
    reserved = [[store.reserve() for _ in range(5)] for store in stores]
    assert reserved[0] == reserved[1]
    entries = np.array(reserved[0], dtype=np.int32)
    stream = cuda.stream()
    arrays = {k: cuda.to_device(np.zeros(5, dtype=np.int32), stream=stream) for k in ("acc", "pos", "e", "t")}
    for m in (dev, ref):
        m.reshape_intermediate_states(5, 3)

    def commit():
        dev.replay_mtp_states(
            arrays["acc"],
            stream=stream,
            positions=arrays["pos"],
            store=stores[0],
            track_entries=arrays["e"],
            track_steps=arrays["t"],
        )

    commit()  # the first call prepares the launch outside capture (all rows padding: nothing moves)
    stream.synchronize()
    handle = int(stream.handle)
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    commit()
    exec_graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    values = {
        "acc": np.array([3, 0, 1, 2, 3], dtype=np.int32),
        "pos": np.array([4, 8, 0, 100, 7], dtype=np.int32),
        "e": entries,
        "t": np.array([2, 0, 0, 1, -1], dtype=np.int32),
    }
    for name, value in values.items():
        arrays[name].copy_to_device(value, stream=stream)
    check(driver.cuGraphLaunch(exec_graph, handle))
    stream.synchronize()
    ref.replay_mtp_states(
        values["acc"], positions=values["pos"], store=stores[1], track_entries=values["e"], track_steps=values["t"]
    )
    got, want = snapshot(dev), snapshot(ref)
    assert got["conv"].tobytes() == want["conv"].tobytes()
    got_rec = got["recurrent"].view(want["recurrent"].dtype)  # a bfloat16 pool snapshots as its uint16 bits
    tol = dict(rtol=3.2e-2, atol=3.2e-2)  # bfloat16 (ulp 2**-7): FMA vs two roundings, then SR, over 3 steps
    np.testing.assert_allclose(got_rec.astype(np.float64), want["recurrent"].astype(np.float64), **tol)
    got_entries, want_entries = [to_host(p) for p in stores[0].entry_pools], stores[1].entry_pools
    assert got_entries[1].view(np.uint16).tobytes() == want_entries[1].view(np.uint16).tobytes()
    np.testing.assert_allclose(
        got_entries[0].view(want_entries[0].dtype).astype(np.float64),
        want_entries[0].astype(np.float64),
        **tol,
    )
    assert want_entries[0][:, entries[[0, 3]]].any()


# ---------------------------------------------------------------- tiled kernels (issue 11: bandwidth-bound replay)
#: (mixer, H, D, N, G, state dtype, stochastic): sizes on and off the tiled kernels' tile edges.
TILED_CASES = [
    ("mamba2", 3, 3, 5, 1, "float16", False),  # N = 5: element accesses, one 8-column lane; D = 3 < RPT rows
    ("mamba2", 2, 17, 33, 2, "bfloat16", True),  # elements: 64-wide tile, 33 live; D = 17: 1 live row in group 4
    ("mamba2", 2, 9, 128, 1, "float32", False),  # 2 elements per word: one full 128-wide tile; D = 9
    ("mamba2", 2, 6, 24, 2, "float16", False),  # 4 per word, packed: a 32-wide tile, its last lane past N; D = 6
    ("mamba2", 1, 4, 264, 1, "bfloat16", False),  # 4 per word, packed: two 256-wide tiles, 8 live in the 2nd; D = 4
    ("mamba2", 2, 12, 24, 1, "float16", False),  # packed: row group 0 whole (8 rows), group 1 4 live rows
    ("mamba2", 2, 6, 24, 2, "bfloat16", True),  # 4 per word, not packed (stochastic): float32 elements from words
    ("mamba2", 2, 6, 24, 1, "bfloat16", False),  # packed bfloat16: a 32-wide tile, its last lane past N; D = 6
    ("mamba2", 1, 3, 16, 1, "float32", False),  # 2 per word: a 16-wide tile; D = 3
    ("gdn", 3, 3, 5, 3, "float32", False),  # one part, guarded; the block spans heads
    ("gdn", 2, 33, 3, 1, "float32", False),  # two parts, guarded: the prediction chain crosses threads
    ("gdn", 1, 96, 3, 1, "float16", False),  # four parts, the last one past D
    ("gdn", 2, 64, 5, 2, "bfloat16", True),  # two exact parts, stochastic rounding
    # real head sizes, on the GPU only (the simulator is too slow there)
    ("mamba2", 8, 64, 128, 2, "bfloat16", True),  # Nemotron-H-like heads
    ("mamba2", 8, 64, 128, 2, "bfloat16", False),
    ("mamba2", 4, 64, 128, 1, "float16", False),
    ("gdn", 4, 128, 128, 2, "bfloat16", True),  # Qwen3-Next-like heads: four parts per column
    ("gdn", 4, 128, 128, 2, "float32", False),
]
#: Cases that ``make test`` leaves to ``make test-long`` on the simulator (20-60 s each there): each path they
#: take has a smaller case in the list (the last two Mamba2 cases stand in for the float32 and bfloat16 ones).
TILED_LONG = {TILED_CASES[i] for i in (1, 2, 4, 11, 12)}
#: The Mamba2 cases whose state the tiled kernel reads as uint64 words: elements per word (others: 0). A
#: 16-bit one without stochastic rounding stays packed in the tile (``tiled.mamba2_packed``).
WORD_CASES = {(2, 9, 128, "float32"): 2, (2, 6, 24, "float16"): 4, (1, 4, 264, "bfloat16"): 4}
WORD_CASES.update({(2, 12, 24, "float16"): 4, (2, 6, 24, "bfloat16"): 4, (1, 3, 16, "float32"): 2})
WORD_CASES.update({(8, 64, 128, "bfloat16"): 4, (4, 64, 128, "float16"): 4})
#: Head size (H * D * N) above which a case runs on the GPU only.
SIMULATED_HEADS = 4096


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(("dim", "size"), [(1, 1), (3, 5), (17, 33), (64, 128), (64, 264), (128, 64), (9, 2048)])
def test_mamba2_tiles_cover_the_head_with_the_fewest_tiles(dim, size, packed):
    from mamba_cache.replay import tiled

    per_thread = tiled.mamba2_rows(packed)
    lanes, row_groups, d_tiles, n_tiles = tiled.mamba2_tiles(dim, size, per_thread)
    assert lanes * row_groups == tiled.THREADS and lanes & (lanes - 1) == 0 and lanes <= tiled.WARP
    rows, cols = row_groups * per_thread, lanes * tiled.CPT
    assert (d_tiles - 1) * rows < dim <= d_tiles * rows, "d tiles"
    assert (n_tiles - 1) * cols < size <= n_tiles * cols, "n tiles"
    assert lanes == tiled.WARP or lanes // 2 * tiled.CPT < size, "a narrower tile would cover N"


def test_replay_blocks_are_128_threads_on_a_gpu_and_one_warp_on_the_simulator():
    from helpers import ON_GPU

    from mamba_cache.replay import kernels, tiled

    assert tiled.THREADS == kernels.THREADS
    assert kernels.THREADS == (128 if ON_GPU else 32)  # the GPU geometry the benchmarks measured


def test_mamba2_word_accesses_need_2_or_4_byte_elements_and_whole_words_per_thread():
    from mamba_cache.replay import tiled

    cpt = tiled.CPT
    for dtype, per_word in ((np.float16, 4), (np.uint16, 4), (np.float32, 2), (np.float64, 0)):
        pool = cuda.device_array((1, 2, 4 * cpt), dtype)
        assert tiled.mamba2_word_elems(pool, 2 * cpt) == per_word, dtype
        assert tiled.mamba2_word_elems(pool, 2 * cpt + 4) == 0, "N not a multiple of CPT"


@pytest.mark.parametrize(
    ("mixer", "heads", "dim", "size", "groups", "dtype", "stochastic"),
    [
        pytest.param(
            *c,
            id=f"{c[0]}-H{c[1]}-D{c[2]}-N{c[3]}-{c[5]}{'-sr' if c[6] else ''}",
            marks=SIMULATOR_LONG if c in TILED_LONG else (),
        )
        for c in TILED_CASES
    ],
)
def test_tiled_replay_kernels_give_the_first_kernels_bits(rng, monkeypatch, mixer, heads, dim, size, groups, dtype,
                                                          stochastic):  # fmt: skip
    """The tiled kernels (the ones the backend launches) == the one-element-per-thread kernels, bit for bit.

    Same order of operations per element, so the same bits on any target: a linear commit with
    positions and tracking, then a tree commit, every pool and store entry compared whole. (A float32
    state shows a changed summation order; a 16-bit store can round the difference away.)
    """
    from helpers import ON_GPU, assert_same_bits
    from replay_oracle import prepare_first

    from mamba_cache.prefix import PrefixStateCache
    from mamba_cache.replay import tiled

    if heads * dim * size > SIMULATED_HEADS and not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine): the simulator is too slow at these sizes")

    config = replay_config(
        mixer,
        dtype,
        max_batch_size=4,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=size,
        n_groups=groups,
        conv_dim=5,
        stochastic_rounding=stochastic,
        rounding_seed=77,
    )
    seed = int(rng.integers(1 << 30))
    managers, stores = [], []
    built, word_elems = tiled.replay_mamba2_kernel, []

    def spy(*args):  # which state access the tiled prepare chose: uint64 words or elements, packed or not
        word_elems.append((args[5], tiled.mamba2_packed(args[0], args[1], args[5])))
        return built(*args)

    for prepare in (prepare_first, tiled.prepare):
        manager, state, _ = filled_pair(config, "numba", np.random.default_rng(seed), replay_kernels=prepare)
        store = PrefixStateCache(manager, entries=4, block_size=4)
        assert [store.reserve() for _ in range(4)] == [0, 1, 2, 3]
        with monkeypatch.context() as patch:  # a spy on the tiled kernel's choice; the launch is built on this call
            patch.setattr(tiled, "replay_mamba2_kernel", spy)
            manager.reshape_intermediate_states(4, 3)
            manager.replay_mtp_states(
                device_int32("numba", [3, 2, 0, 1]),
                state_indices=device_int32("numba", [2, 0, 1, 3]),
                positions=device_int32("numba", [5, 0, 9, 7]),
                store=store,
                track_entries=device_int32("numba", [1, 0, 2, 3]),
                track_steps=device_int32("numba", [1, 1, 0, 0]),
            )
        managers.append(manager)
        stores.append(store)
    if mixer == "mamba2":
        key = (heads, dim, size, dtype)
        packed = dtype != "float32" and not stochastic and key in WORD_CASES
        assert word_elems == [(WORD_CASES.get(key, 0), packed)], "the state access the case is for"
    first, second = (snapshot(m) for m in managers)
    assert_same_bits(first, second, "linear commit with tracking")
    for pool_a, pool_b in zip(stores[0].entry_pools, stores[1].entry_pools, strict=True):
        assert to_host(pool_a).tobytes() == to_host(pool_b).tobytes(), "tracked entries"
    assert (first["recurrent"][:, [0, 2, 3]] != state["recurrent"][:, [0, 2, 3]]).any(), "the replay changed nothing"
    assert first["recurrent"][:, 1].tobytes() == state["recurrent"][:, 1].tobytes(), "a padding row's slot moved"
    nodes = device_int32("numba", [[2, 0, 1], [1, 2, 0], [0, 9, 1], [2, 1, 0]])  # row 2's path leaves [0, V)
    for manager in managers:
        manager.replay_accepted_tree_states(
            nodes, device_int32("numba", [3, 2, 2, 1]), positions=device_int32("numba", [8, 2, 9, 8])
        )
    assert_same_bits(snapshot(managers[0]), snapshot(managers[1]), "tree commit")


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_tiled_replay_kernels_over_many_steps_and_with_a_wide_conv_window(rng, mixer):
    """Eleven steps (Mamba2 carries its one-step-ahead stash loads along, GDN its key buffers) and a conv
    window wider than ``tiled.CONV_MAX_WIDTH`` (one channel per thread, the first kernels' conv update): the
    first kernels' bits."""
    from helpers import assert_same_bits
    from replay_oracle import prepare_first

    from mamba_cache.replay import tiled

    verify = 11
    assert tiled.CONV_MAX_WIDTH + 1 == 5  # the window below is one wider than the register path takes
    config = replay_config(mixer, "float16", max_batch_size=3, max_intermediate_seq_len=verify, conv_kernel=5)
    seed = int(rng.integers(1 << 30))
    managers = []
    for prepare in (prepare_first, tiled.prepare):
        manager, state, _ = filled_pair(config, "numba", np.random.default_rng(seed), replay_kernels=prepare)
        manager.replay_mtp_states(device_int32("numba", [verify, 9, 2]))
        managers.append(manager)
    first, second = (snapshot(m) for m in managers)
    assert_same_bits(first, second, "replay over many steps")
    assert (first["recurrent"] != state["recurrent"]).any() and (first["conv"] != state["conv"]).any()


def _ptxas() -> str | None:
    import glob
    import shutil

    found = shutil.which("ptxas") or sorted(glob.glob("/usr/local/cuda*/bin/ptxas"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.mark.slow  # ptxas over every tiled kernel variant: 40 s of compiles
def test_tiled_replay_kernels_neither_spill_nor_crowd_the_register_file():
    """ptxas -v (sm_90, no GPU needed), each kernel built with the launch bounds the backend gives it: 0 spill
    bytes for the tiled Mamba2 kernels and the tiled GDN kernel at D = 64, at most 128 registers for GDN; the
    GDN kernels at D = 128, bounded to 8 blocks per SM, fit 64 registers with at most 32 bytes of spill traffic
    (a few scalars kept across the step loops, where a spilled column is kilobytes). The first GDN kernel at
    D = 128 spills: the check can fail."""
    import os
    import subprocess
    import sys
    import textwrap

    from mamba_cache.replay import tiled

    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas is not installed (it comes with the CUDA toolkit)")
    script = textwrap.dedent("""
        import inspect, re, subprocess, sys, tempfile
        import numpy as np
        import numba.cuda.dispatcher as dispatcher
        from numba import cuda, types
        from numba.np import numpy_support

        class Device:  # compiling a non-inlined device function asks the current device for its cc
            compute_capability = (9, 0)

        dispatcher.get_current_device = lambda: Device()
        from mamba_cache.replay import kernels as rk, tiled as tk

        sys.path.insert(0, sys.argv[2])  # the tests' folder: the first kernels are the tests' oracle
        from replay_oracle import first_gdn_kernel

        def signature(kernel, dtype, words="uint64"):
            array = lambda dt, nd: types.Array(numpy_support.from_dtype(np.dtype(dt)), nd, "C")
            args = []
            for name in inspect.signature(kernel.py_func).parameters:
                if name in ("rec", "track_rec", "conv", "track_conv"):
                    args.append(array(dtype, 3))
                elif name == "rec_words":  # the pool's uint64 view (with words off, the pool again)
                    args.append(array(words, 3))
                elif name in ("dA", "u", "B", "g", "beta", "k", "v"):
                    args.append(array("float32", 2))
                elif name == "col":
                    args.append(array(dtype, 2))
                elif name == "node_ids":
                    args.append(array("int32", 2))
                elif name in ("accept_lengths", "state_indices", "positions", "track_entries", "track_steps"):
                    args.append(array("int32", 1))
                else:
                    args.append(types.int64)
            return tuple(args)

        cases = [
            # Nemotron-H-8B's heads (D = 64, N = 128, 16 heads per group), as the backend builds them
            ("mamba2 float16", tk.replay_mamba2_kernel(rk.ROUND_HALF, 0, 64, 128, 16, 4), "float16"),
            ("mamba2 bfloat16", tk.replay_mamba2_kernel(rk.ROUND_BF16, 1, 64, 128, 16, 4), "uint16"),
            ("mamba2 float32", tk.replay_mamba2_kernel(rk.ROUND_NONE, 0, 64, 128, 16, 2), "float32"),
            ("mamba2 float16 edges", tk.replay_mamba2_kernel(rk.ROUND_HALF, 0, 17, 33, 2, 0), "float16", "float16"),
            ("gdn D=128 float32", tk.replay_gdn_kernel(128, rk.ROUND_NONE, 0), "float32"),
            ("gdn D=64 float32", tk.replay_gdn_kernel(64, rk.ROUND_NONE, 0), "float32"),
            ("gdn D=128 bfloat16", tk.replay_gdn_kernel(128, rk.ROUND_BF16, 1), "uint16"),
            ("gdn D=128 float16", tk.replay_gdn_kernel(128, rk.ROUND_HALF, 0), "float16"),
            ("first gdn D=128 float32", first_gdn_kernel(128, rk.ROUND_NONE, 0), "float32"),
        ]
        with tempfile.TemporaryDirectory() as tmp:
            for name, kernel, dtype, *words in cases:
                bounds = kernel.targetoptions.get("launch_bounds")  # the kernel's own, as the backend launches it
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature(kernel, dtype, *words), cc=(9, 0),
                                          launch_bounds=bounds)
                ptx = re.sub(r"^\\.version \\d+\\.\\d+", ".version 8.0", ptx, flags=re.M)  # any ptxas >= 12.0 reads it
                with open(tmp + "/k.ptx", "w") as f:
                    f.write(ptx)
                out = subprocess.run([sys.argv[1], "-arch=sm_90", "-v", tmp + "/k.ptx", "-o", tmp + "/k.cubin"],
                                     capture_output=True, text=True, check=True).stderr
                spill = sum(int(x) for x in re.findall(r"(\\d+) bytes spill", out))
                registers = int(re.search(r"Used (\\d+) registers", out).group(1))
                print(f"{name}: {registers} registers, {spill} spill bytes, bounds {bounds[1] if bounds else 0}")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", script, ptxas, tests], env=env, capture_output=True, text=True, timeout=900
    )
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    print(report)
    assert len(report) == 9, result.stdout
    for name, line in report.items():
        registers, spill, blocks = (int(word) for word in line.split() if word.isdigit())
        if name.startswith("first"):
            assert spill > 0, f"{name}: {line} (the spill this test exists to catch)"
        elif name.startswith("gdn D=128"):
            assert blocks == tiled.GDN_MIN_BLOCKS == 8, f"{name}: {line} (built with the launch bounds)"
            assert registers <= 64 and spill <= 32, f"{name}: {line}"
        else:
            assert spill == 0 and blocks == 0, f"{name}: {line}"
            assert not name.startswith("gdn") or registers <= 128, f"{name}: {line}"


def _edge_float32_bits(rng) -> np.ndarray:
    """float32 bit patterns a float16 or bfloat16 rounding must get right: random ones, NaNs, infinities,
    the largest finite values, zeros, subnormals, float16's range edges, and ties to both formats."""
    signs = rng.integers(0, 2, 64, dtype=np.uint32) << np.uint32(31)
    high = rng.integers(0, 2**16, 64, dtype=np.uint32) << np.uint32(16)
    near_half = signs | rng.integers(0x33000000, 0x47800000, 64, dtype=np.uint32)  # float16's range
    parts = [
        rng.integers(0, 2**32, 512, dtype=np.uint64).astype(np.uint32),
        signs | np.uint32(0x7F800000) | rng.integers(1, 2**23, 64, dtype=np.uint32),  # NaNs, quiet and signalling
        np.array([0x7F800000, 0xFF800000, 0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000], np.uint32),
        np.array([0x477FE000, 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x387FC000], np.uint32),  # fp16 edges
        signs | rng.integers(1, 2**23, 64, dtype=np.uint32),  # float32 subnormals
        high | np.uint32(0x8000),  # bfloat16 ties: to even
        high | np.uint32(0x7FFF),
        (near_half & np.uint32(0xFFFFE000)) | np.uint32(0x1000),  # float16 ties (normal range)
        near_half,
    ]
    return np.concatenate(parts).astype(np.uint32)


def test_paired_16bit_conversions_give_the_one_value_conversions_bits(rng):
    # The packed Mamba2 replay tile's conversions (cvt.rn.f16x2.f32, cvt.rn.bf16x2.f32 and cvt.f32.f16
    # of either half of a word on the GPU) against IEEE nearest even (NumPy's float16, ml_dtypes'
    # bfloat16) and against the one-value conversions run beside them, both halves in their place. On
    # the simulator the pair functions are the one-value stand-ins (NumPy / ml_dtypes casts) twice, so
    # there the test checks only that each half lands in its place; the conversions are checked on the GPU.
    import ml_dtypes

    from mamba_cache.precision import kernels as pk

    @cuda.jit
    def pairs(half_pair, half_one, bf16_pair, bf16_one, bits):
        i = cuda.grid(1)
        if i < half_pair.shape[0]:
            low, high = pk.float32_from_bits(bits[2 * i]), pk.float32_from_bits(bits[2 * i + 1])
            half_pair[i] = pk.half2_rn_bits(low, high)
            half_one[i] = pk.half_rn_bits(low) | (pk.half_rn_bits(high) << np.uint32(16))
            bf16_pair[i] = pk.bfloat162_rn_bits(low, high)
            bf16_one[i] = pk.bfloat16_rn_bits(low) | (pk.bfloat16_rn_bits(high) << np.uint32(16))

    @cuda.jit
    def halves(low, high, words):
        i = cuda.grid(1)
        if i < words.shape[0]:
            low[i] = pk.float32_bits(pk.half_low_float32(words[i]))
            high[i] = pk.float32_bits(pk.half_high_float32(words[i]))

    bits = _edge_float32_bits(rng)
    bits = bits[: bits.size // 2 * 2]
    n = bits.size // 2
    outs = [cuda.to_device(np.zeros(n, np.uint32)) for _ in range(4)]
    pairs[-(-n // 128), 128](*outs, cuda.to_device(bits))
    half_pair, half_one, bf16_pair, bf16_one = (out.copy_to_host() for out in outs)
    values = bits.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = {
            "float16": values.astype(np.float16).view(np.uint16).astype(np.uint32),
            "bfloat16": values.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32),
        }
    for name, pair, one in (("float16", half_pair, half_one), ("bfloat16", bf16_pair, bf16_one)):
        assert pair.tobytes() == one.tobytes(), f"{name}: the paired conversion != the one-value conversion twice"
        got = np.stack([pair & np.uint32(0xFFFF), pair >> np.uint32(16)], axis=1).reshape(-1)
        exp_mask = np.uint32(0x7C00 if name == "float16" else 0x7F80)
        nan = (got & exp_mask == exp_mask) & (got & (np.uint32(0x7FFF) & ~exp_mask) != 0)
        assert (nan == np.isnan(values)).all(), f"{name}: a NaN in, a NaN out, nothing else"
        bad = np.flatnonzero((got != want[name]) & ~np.isnan(values))
        assert bad.size == 0, [(name, hex(bits[i]), hex(got[i]), hex(want[name][i])) for i in bad[:8]]

    edges = np.array([0, 0x8000, 1, 0x8001, 0x3FF, 0x400, 0x7BFF, 0x7C00, 0xFC00, 0x7C01, 0x7E00, 0xFFFF], np.uint32)
    halves_in = np.concatenate([edges, rng.integers(0, 2**16, 1012, dtype=np.uint32)])
    words = halves_in | (rng.permutation(halves_in) << np.uint32(16))
    low, high = (cuda.to_device(np.zeros(words.size, np.uint32)) for _ in range(2))
    halves[words.size // 128, 128](low, high, cuda.to_device(words))
    for name, got, part in (("low", low, words & np.uint32(0xFFFF)), ("high", high, words >> np.uint32(16))):
        expect = part.astype(np.uint16).view(np.float16).astype(np.float32)
        got = got.copy_to_host().view(np.float32)
        finite = ~np.isnan(expect)
        assert np.isnan(got[~finite]).all(), f"{name} half: a NaN in, a NaN out"
        bad = np.flatnonzero(got[finite].view(np.uint32) != expect[finite].view(np.uint32))
        assert bad.size == 0, [(name, hex(part[finite][i]), got[finite][i], expect[finite][i]) for i in bad[:8]]


def test_the_gpu_arithmetic_returns_the_canonical_nan(rng):
    # Why the packed bfloat16 Mamba2 tile rounds with cvt.rn.bf16x2.f32 and no NaN select: every
    # value it rounds is mamba2_update's result (FMUL, then FFMA), and on the GPU a NaN result is
    # the canonical 0x7FFFFFFF whatever the operands' payloads and signs, which cvt.rn.bf16x2.f32
    # and the reference's rounding both take to 0x7FFF. (NumPy's arithmetic keeps a payload, so the
    # simulator's kernels keep the select.)
    from helpers import ON_GPU

    from mamba_cache.precision.kernels import bfloat162_rn_bits, float32_bits, float32_from_bits
    from mamba_cache.precision.reference import convert_bits
    from mamba_cache.replay import kernels as rk

    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (runs on the GPU machine): a claim about the hardware's arithmetic")

    @cuda.jit
    def update(out, h, decay, u, b):
        i = cuda.grid(1)
        if i < out.shape[0]:
            out[i] = float32_bits(
                rk.mamba2_update(
                    float32_from_bits(h[i]),
                    float32_from_bits(decay[i]),
                    float32_from_bits(u[i]),
                    float32_from_bits(b[i]),
                )
            )

    n = 1024
    signs = rng.integers(0, 2, (4, n), dtype=np.uint32) << np.uint32(31)
    nans = signs | np.uint32(0x7F800000) | rng.integers(1, 2**23, (4, n), dtype=np.uint32)
    finite = rng.standard_normal((4, n)).astype(np.float32).view(np.uint32)
    which = rng.integers(0, 4, n)  # one operand a NaN in each element, any of the four, some with more
    operands = np.where(np.arange(4)[:, None] == which[None, :], nans, finite)
    operands[:, : n // 8] = nans[:, : n // 8]
    inf, ninf, zero, one = (np.float32(x).view(np.uint32) for x in (np.inf, -np.inf, 0.0, 1.0))
    operands[:, n // 8] = (inf, zero, one, one)  # h * dA = inf * 0: a NaN made, not passed on
    operands[:, n // 8 + 1] = (inf, one, ninf, one)  # fma(-inf, 1, inf): inf - inf
    operands[:, n // 8 + 2] = (zero, inf, one, one)  # 0 * inf
    out = cuda.to_device(np.zeros(n, np.uint32))
    update[n // 128, 128](out, *(cuda.to_device(np.ascontiguousarray(x)) for x in operands))
    got = out.copy_to_host()
    assert (got == np.uint32(0x7FFFFFFF)).all(), [hex(x) for x in got[got != 0x7FFFFFFF][:8]]
    # ... which the pair rounding and the reference's rounding both take to 0x7FFF
    assert convert_bits(np.array([0x7FFFFFFF], np.uint64), (8, 23), (8, 7))[0] == 0x7FFF, "the reference's bits"

    @cuda.jit
    def pair(out):
        nan = float32_from_bits(np.uint32(0x7FFFFFFF))
        out[0] = bfloat162_rn_bits(nan, nan)

    out = cuda.to_device(np.zeros(1, np.uint32))
    pair[1, 1](out)
    assert out.copy_to_host()[0] == 0x7FFF7FFF, hex(out.copy_to_host()[0])


def test_bfloat16_state_rounding_matches_the_reference_on_edge_bit_patterns(rng):
    # The replay kernels' bfloat16 rounding (the hardware's cvt.rn.bf16.f32 plus a NaN select on
    # the GPU, the integer shortcut on the simulator) against the reference's conversion, bit for
    # bit: NaN payloads of both signs, infinities, the largest finite values (which round to
    # infinity), zeros, float32 subnormals, exact ties and their neighbours, random patterns.
    from mamba_cache.precision.kernels import float32_bits, float32_from_bits
    from mamba_cache.precision.reference import convert_bits
    from mamba_cache.replay import kernels as rk

    rounder = rk._rounder(rk.ROUND_BF16)  # on an sm_80+ GPU the hardware path; on the simulator the shortcut

    @cuda.jit
    def run(out, bits):
        i = cuda.grid(1)
        if i < bits.shape[0]:
            h = rounder(float32_from_bits(bits[i]), 1, 8, 7, 0, i, 0, 0, 0, 0)
            out[i] = float32_bits(h)

    @cuda.jit
    def run_hw(out, bits):  # the hardware path itself (on the simulator, ml_dtypes' cast stands in for cvt)
        i = cuda.grid(1)
        if i < bits.shape[0]:
            out[i] = float32_bits(rk.round_bfloat16_hw(float32_from_bits(bits[i])))

    signs = rng.integers(0, 2, 64, dtype=np.uint32) << np.uint32(31)
    high = rng.integers(0, 2**16, 64, dtype=np.uint32) << np.uint32(16)
    parts = [
        rng.integers(0, 2**32, 512, dtype=np.uint64).astype(np.uint32),
        signs | np.uint32(0x7F800000) | rng.integers(1, 2**23, 64, dtype=np.uint32),  # NaNs, quiet and signalling
        np.array([0x7F800000, 0xFF800000, 0, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000], np.uint32),
        signs | rng.integers(1, 2**23, 64, dtype=np.uint32),  # float32 subnormals
        high | np.uint32(0x8000),  # ties: to even
        high | np.uint32(0x8001),
        high | np.uint32(0x7FFF),
    ]
    bits = np.concatenate(parts).astype(np.uint32)
    want = convert_bits(bits.astype(np.uint64), (8, 23), (8, 7)).astype(np.uint32) << np.uint32(16)
    for kernel in (run, run_hw):
        out = cuda.to_device(np.zeros_like(bits))
        kernel[-(-bits.size // 128), 128](out, cuda.to_device(bits))
        got = out.copy_to_host()
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, [(kernel.__name__, hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:8]]
