"""Checkpointed decoding (``commit_mode="checkpoint"``, NumPy reference): a checkpoint plus a history ring per slot.

Three independent references: with ``R = S`` every commit folds, so the main pools must equal a
replay-mode manager's, call for call; with ``R > S`` the current (folded) state must equal a
token-by-token decode through the step functions from the initial state, whenever the folds
happen; and the reading function ``state_after`` must equal ``current_state``.
"""

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    ON_GPU,
    REPLAY_TOLERANCE,
    SIMULATOR_LONG,
    needs_gpu,
    replay_config,
    snapshot,
    stash_values,
    to_host,
    write_pool,
)
from numba import cuda

from mamba_cache import ConfigError, NumpyMambaCacheManager
from mamba_cache.checkpoint.reference import state_after
from mamba_cache.precision import convert
from mamba_cache.replay.reference import gdn_step, mamba2_step

F32 = np.float32
INT32_MIN = -(2**31)
MIXERS = ["mamba2", "gdn"]
#: (state dtype, stochastic rounding): every stored step rounds, stochastically keyed by position in the last.
PRECISIONS = [("float32", False), ("float16", False), ("bfloat16", False), ("bfloat16", True)]


def ckpt_config(mixer="mamba2", dtype="float32", seq=3, ring=3, commit_mode="checkpoint", **overrides):
    history = ring if commit_mode == "checkpoint" else 0
    fields = dict(max_intermediate_seq_len=seq, commit_mode=commit_mode, history_len=history, rounding_seed=12345)
    return replay_config(mixer, dtype, **{**fields, **overrides})


def window_values(config, rng, active, seq_len):
    """One verify window's stash, ``[L, active, V, *shape]`` per field (`helpers.stash_values`)."""
    return stash_values(config, rng, (active, seq_len))


def write_ring(manager, values, slots):
    """The verify pass of checkpoint mode: window step t of row b goes to ring step h[s] + t of its slot."""
    h = manager.history_lengths()
    for layer in range(manager.num_layers()):
        for name, view in manager.get_history(layer).items():
            ring = view if isinstance(view, np.ndarray) else to_host(view)  # Numba: written back below
            for row, slot in enumerate(slots):
                if 0 <= slot < manager.get_config().max_batch_size:
                    value = values[name][layer, row]
                    ring[slot, h[slot] : h[slot] + value.shape[0]] = value.view(ring.dtype)
            if ring is not view:
                view.copy_to_device(ring)


def write_stash(manager, values):
    """The verify pass of replay mode: window step t of row b goes to stash [b, t]."""
    for layer in range(manager.num_layers()):
        stash = manager.get_replay_stash(layer)
        for name, value in values.items():
            stash[name][...] = value[layer]


def random_main_pools(managers, config, rng):
    """The same random (normal) states in the main pools of each manager."""
    recurrent = rng.standard_normal(managers[0].pools.recurrent.shape).astype(config.recurrent_state_dtype)
    conv = rng.standard_normal(managers[0].pools.conv.shape).astype(config.conv_state_dtype)
    for manager in managers:
        write_pool(manager, "recurrent", recurrent)
        write_pool(manager, "conv", conv)


def main_pools(manager):
    """Host copies of the main pools, in the config's dtypes (a Numba bfloat16 pool's raw bits viewed back)."""
    config = manager.get_config()
    return {
        kind: value.view(getattr(config, f"{kind}_state_dtype"))
        for kind, value in snapshot(manager).items()
        if kind in ("recurrent", "conv")
    }


def current(manager, slot):
    """A slot's current state, stacked: ``(recurrent [L, H, D, N], conv [L, C, K])``, host arrays."""
    recurrent, conv = manager.current_state(slot)
    config = manager.get_config()
    return tuple(
        np.stack([to_host(a)[0] for a in arrays]).view(getattr(config, f"{kind}_state_dtype"))
        for arrays, kind in ((recurrent, "recurrent"), (conv, "conv"))
    )


# ---------------------------------------------------------------- 1. R = S: the replay commit, call for call
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize(("dtype", "stochastic"), PRECISIONS)
def test_ring_of_one_window_folds_at_every_commit_as_the_replay_commit(rng, mixer, dtype, stochastic):
    seq = 3
    config = ckpt_config(mixer, dtype, seq=seq, ring=seq, stochastic_rounding=stochastic)
    checkpoint = NumpyMambaCacheManager(config)
    replay = NumpyMambaCacheManager(
        ckpt_config(mixer, dtype, seq=seq, commit_mode="replay", stochastic_rounding=stochastic)
    )
    random_main_pools([checkpoint, replay], config, rng)
    start = rng.integers(0, 10_000, config.max_batch_size)
    checkpoint.set_positions(np.arange(config.max_batch_size, dtype=np.int32), start.astype(np.int64))
    # rows name permuted slots; slot 2 is never named; one row pads (0, INT32_MIN, V + 1)
    slots = np.array([3, 0, 4, 1], dtype=np.int32)
    before_untouched = main_pools(checkpoint)
    windows = [(4, 3), (4, 3), (3, 2), (4, 3), (4, 1)]
    for window, (active, seq_len) in enumerate(windows):
        accept = rng.choice([1, seq_len, 2 if seq_len >= 2 else 1], size=active).astype(np.int32)
        accept[window % active] = [0, INT32_MIN, seq_len + 1, -1, 0][window]  # a padding row
        values = window_values(config, rng, active, seq_len)
        for manager in (checkpoint, replay):
            manager.reshape_intermediate_states(active, seq_len)
        write_ring(checkpoint, values, slots[:active])
        write_stash(replay, values)
        p0 = checkpoint.checkpoint_positions()
        positions = p0[slots[:active]].astype(np.int32)
        checkpoint.checkpoint_mtp_states(accept, state_indices=slots[:active])
        replay.replay_mtp_states(accept, state_indices=slots[:active], positions=positions)
        got, want = main_pools(checkpoint), main_pools(replay)
        for kind in got:
            assert got[kind].tobytes() == want[kind].tobytes(), (
                f"window {window}: {kind} differs from the replay commit"
            )
        committed = (accept >= 1) & (accept <= seq_len)
        moved = np.zeros(config.max_batch_size, np.int64)
        moved[slots[:active][committed]] = accept[committed]
        assert checkpoint.history_lengths().tolist() == [0] * config.max_batch_size  # folded at every commit
        assert (checkpoint.checkpoint_positions() == p0 + moved).all()
        for kind in got:  # slot 2 is named by no row
            assert got[kind][:, 2].tobytes() == before_untouched[kind][:, 2].tobytes()
    assert (checkpoint.checkpoint_positions() > start).sum() == 4  # every named slot committed something


# ---------------------------------------------------------------- 2. R > S: token-by-token decoding
class Decoder:
    """The independent reference: each slot's state, advanced one accepted token at a time from the start."""

    def __init__(self, config, recurrent, conv, positions):
        self.config = config
        self.recurrent, self.conv = recurrent.copy(), conv.copy()
        self.positions = positions.astype(np.int64).copy()
        self.step_fn = mamba2_step if config.mixer == "mamba2" else gdn_step
        self.names = ["dA", "u", "B"] if config.mixer == "mamba2" else ["g", "beta", "k", "v"]

    def decode(self, slot, values, row, steps):
        config, layers = self.config, self.config.num_recurrent_layers
        for t in range(steps):
            self.positions[slot] += 1
            for layer in range(layers):
                new = self.step_fn(
                    self.recurrent[layer, slot].astype(F32), *(values[n][layer, row, t] for n in self.names)
                )
                stored = convert(
                    new.reshape(1, -1),
                    config.recurrent_state_dtype,
                    stochastic=config.stochastic_rounding,
                    seed=config.rounding_seed,
                    kind=0,
                    layer=np.array([layer]),
                    position=np.array([self.positions[slot]]),
                )
                self.recurrent[layer, slot] = stored.reshape(new.shape)
                window = self.conv[layer, slot]
                self.conv[layer, slot] = np.concatenate([window[:, 1:], values["conv"][layer, row, t][:, None]], axis=1)


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize(("dtype", "stochastic"), [("float32", False), ("bfloat16", True)])
def test_long_run_keeps_the_decoded_state_whenever_it_folds(rng, mixer, dtype, stochastic):
    seq, ring = 3, 8
    config = ckpt_config(mixer, dtype, seq=seq, ring=ring, stochastic_rounding=stochastic)
    manager = NumpyMambaCacheManager(config)
    random_main_pools([manager], config, rng)
    start = rng.integers(0, 10_000, config.max_batch_size).astype(np.int64)
    manager.set_positions(np.arange(config.max_batch_size, dtype=np.int32), start)
    initial = main_pools(manager)
    decoder = Decoder(config, initial["recurrent"], initial["conv"], start)
    slots = np.array([4, 1, 0, 3], dtype=np.int32)  # slot 2 is never named
    folds = 0
    for window in range(14):
        active, seq_len = 4, (3, 2, 3, 1)[window % 4]
        accept = rng.integers(0, seq_len + 1, active).astype(np.int32)
        accept[window % active] = (0, seq_len, INT32_MIN, seq_len + 1)[window % 4]
        values = window_values(config, rng, active, seq_len)
        manager.reshape_intermediate_states(active, seq_len)
        write_ring(manager, values, slots)
        before, p0, h = main_pools(manager), manager.checkpoint_positions(), manager.history_lengths()
        manager.checkpoint_mtp_states(accept, state_indices=slots)
        for row, slot in enumerate(slots):
            if 1 <= accept[row] <= seq_len:
                decoder.decode(slot, values, row, int(accept[row]))
        after, p0_after, h_after = main_pools(manager), manager.checkpoint_positions(), manager.history_lengths()
        assert ((h_after >= 0) & (h_after <= ring - seq)).all(), h_after
        assert (p0_after + h_after == decoder.positions).all()  # the current state's token count
        for slot in range(config.max_batch_size):
            folded = p0_after[slot] != p0[slot]
            folds += folded
            assert folded == (h[slot] + (p0_after + h_after - p0 - h)[slot] + seq > ring)
            for kind in after:  # the main pools change only where a slot folds
                same = after[kind][:, slot].tobytes() == before[kind][:, slot].tobytes()
                assert same or folded, (window, slot, kind)
            recurrent, conv = current(manager, slot)
            assert recurrent.tobytes() == decoder.recurrent[:, slot].tobytes(), (window, slot, "recurrent")
            assert conv.tobytes() == decoder.conv[:, slot].tobytes(), (window, slot, "conv")
        for kind in after:
            assert after[kind][:, 2].tobytes() == initial[kind][:, 2].tobytes()
    assert folds >= 6, folds  # the run folded several times, and not only
    assert manager.history_lengths().any()


# ---------------------------------------------------------------- 3. reading, copying, materializing, counters
def filled_rings(rng, mixer="gdn", dtype="bfloat16", stochastic=True, backends=("numpy",)):
    """Checkpoint managers (S = 3, R = 8), one per backend, with the same states and two committed windows.

    Nothing folded: ``h = [0, 5, 0, 3, 0]``, ``p0 = [7, 100, 5, 0, 3]``.
    """
    config = ckpt_config(mixer, dtype, seq=3, ring=8, stochastic_rounding=stochastic)
    managers = [BACKENDS[backend](config) for backend in backends]
    random_main_pools(managers, config, rng)
    slots = np.array([1, 3, 0], dtype=np.int32)
    for manager in managers:
        manager.set_positions(np.array([0, 1, 2, 3, 4], np.int32), np.array([7, 100, 5, 0, 3], np.int64))
    for accept in ([3, 1, 0], [2, 2, 0]):
        values = window_values(config, rng, 3, 3)
        for manager in managers:
            manager.reshape_intermediate_states(3, 3)
            write_ring(manager, values, slots)
            manager.checkpoint_mtp_states(np.array(accept, np.int32), state_indices=slots)
    for manager in managers:
        assert manager.history_lengths().tolist() == [0, 5, 0, 3, 0]
    return config, managers


def filled_ring(rng, mixer="gdn", dtype="bfloat16", stochastic=True):
    """One NumPy manager of `filled_rings`."""
    config, (manager,) = filled_rings(rng, mixer, dtype, stochastic)
    return config, manager


def test_state_after_reads_the_state_before_each_window_step(rng):
    config, manager = filled_ring(rng)
    h, p0 = manager.history_lengths(), manager.checkpoint_positions()
    pools = manager.pools
    history = {name: manager._history[name] for name in config.replay_stash_fields}
    slots = np.array([1, 3])
    recurrent, conv = state_after(config, pools.recurrent, pools.conv, history, slots, h[slots], p0[slots])
    for i, slot in enumerate(slots):
        want = current(manager, slot)
        assert recurrent[:, i].tobytes() == want[0].tobytes() and conv[:, i].tobytes() == want[1].tobytes()
    # the next window writes step t at h + t; the state before step t is state_after(h + t): commit t steps to see it
    values = window_values(config, rng, 1, 3)
    manager.reshape_intermediate_states(1, 3)
    write_ring(manager, values, [3])
    ring = {name: view[:, :] for name, view in history.items()}
    before = [state_after(config, pools.recurrent, pools.conv, ring, [3], [h[3] + t], [p0[3]]) for t in range(3)]
    manager.checkpoint_mtp_states(np.array([2], np.int32), state_indices=np.array([3], np.int32))
    assert manager.history_lengths()[3] == 5  # no fold: 3 + 2 + 3 <= 8
    got = current(manager, 3)
    assert before[2][0][:, 0].tobytes() == got[0].tobytes() and before[2][1][:, 0].tobytes() == got[1].tobytes()
    assert before[1][0][:, 0].tobytes() != got[0].tobytes()  # one step short is another state
    assert before[0][0].tobytes() == recurrent[:, 1:2].tobytes()  # step 0 starts from the state after h
    # the ring views of get_history are the [L, B, R, ...] layout state_after reads: flat pools work the same
    flat = state_after(config, pools.recurrent, pools.conv, manager._history, [3], [5], [p0[3]])
    assert flat[0].tobytes() == got[0].tobytes()
    with pytest.raises(ValueError, match="steps must be in"):
        state_after(config, pools.recurrent, pools.conv, history, [3], [9], [0])
    with pytest.raises(ValueError, match="distinct"):
        state_after(config, pools.recurrent, pools.conv, history, [3, 3], [1, 1], [0, 0])


def test_capture_copy_and_save_give_the_folded_state_and_leave_the_source(rng, tmp_path):
    config, manager = filled_ring(rng)
    want = current(manager, 1)
    assert want[0].tobytes() != manager.pools.recurrent[:, 1].tobytes()  # the ring matters
    before, h, p0 = main_pools(manager), manager.history_lengths(), manager.checkpoint_positions()
    ring = {name: value.copy() for name, value in manager._history.items()}
    recurrent = np.stack([a[0] for a in manager.capture_recurrent_states(1)])
    conv = np.stack([a[0] for a in manager.capture_conv_states(1)])
    assert recurrent.tobytes() == want[0].tobytes() and conv.tobytes() == want[1].tobytes()
    out = (np.zeros_like(manager.pools.recurrent[:, :1]), np.zeros_like(manager.pools.conv[:, :1]))
    manager.capture_states(1, out=out)
    assert out[0][:, 0].tobytes() == want[0].tobytes() and out[1][:, 0].tobytes() == want[1].tobytes()
    into = np.zeros_like(manager.pools.recurrent[:, :1])
    manager.capture_recurrent_states(1, out=into)
    assert into[:, 0].tobytes() == want[0].tobytes()
    path = tmp_path / "slot.npz"
    manager.save_slot(path, 1)
    plain = NumpyMambaCacheManager(ckpt_config("gdn", "bfloat16", commit_mode="scatter", stochastic_rounding=True))
    plain.load_slot(path, 0)
    assert plain.pools.recurrent[:, 0].tobytes() == want[0].tobytes()
    assert plain.pools.conv[:, 0].tobytes() == want[1].tobytes()

    def source_unchanged():
        after = main_pools(manager)
        for kind in after:
            assert after[kind][:, 1].tobytes() == before[kind][:, 1].tobytes()
        assert manager.history_lengths()[1] == 5 and manager.checkpoint_positions()[1] == 100
        for name, value in manager._history.items():
            assert value.tobytes() == ring[name].tobytes()

    source_unchanged()
    manager.copy_slots(np.array([1, 1, -1], np.int32), np.array([2, 4, 0], np.int32))  # one source, two destinations
    source_unchanged()
    for slot in (2, 4):
        assert current(manager, slot)[0].tobytes() == want[0].tobytes()
        assert manager.pools.recurrent[:, slot].tobytes() == want[0].tobytes()  # folded into the checkpoint
        assert manager.pools.conv[:, slot].tobytes() == want[1].tobytes()
    assert manager.history_lengths().tolist() == [0, 5, 0, 3, 0]
    assert manager.checkpoint_positions().tolist() == [p0[0], 100, 105, p0[3], 105]
    assert manager.pools.recurrent[:, 0].tobytes() == before["recurrent"][:, 0].tobytes()  # the padding pair
    with pytest.raises(ValueError, match="distinct"):
        manager.copy_slots(np.array([1, 3], np.int32), np.array([2, 2], np.int32))
    with pytest.raises(ValueError, match="also be sources"):
        manager.copy_slots(np.array([1, 3], np.int32), np.array([3, 2], np.int32))
    assert manager.history_lengths()[3] == h[3]


def test_materialize_folds_into_the_checkpoint(rng):
    config, manager = filled_ring(rng)
    want = {slot: current(manager, slot) for slot in range(config.max_batch_size)}
    before = main_pools(manager)
    p0 = manager.checkpoint_positions()
    manager.materialize(np.array([1, 0, -1, 7], np.int32))  # slot 0 has h = 0: a no-op; -1 and 7 pad
    assert manager.history_lengths().tolist() == [0, 0, 0, 3, 0]
    assert manager.checkpoint_positions().tolist() == [p0[0], 105, p0[2], p0[3], p0[4]]
    for layer in range(config.num_recurrent_layers):
        assert manager.get_recurrent_state(layer)[1].tobytes() == want[1][0][layer].tobytes()
        assert manager.get_conv_state(layer)[1].tobytes() == want[1][1][layer].tobytes()
    after = main_pools(manager)
    for kind in after:
        for slot in (0, 2, 3, 4):
            assert after[kind][:, slot].tobytes() == before[kind][:, slot].tobytes()
    for slot in range(config.max_batch_size):  # the current state is where it was
        assert current(manager, slot)[0].tobytes() == want[slot][0].tobytes()
    with pytest.raises(ValueError, match="distinct"):
        manager.materialize(np.array([3, 3], np.int32))
    with pytest.raises(TypeError, match="int32"):
        manager.materialize(np.array([3], np.int64))
    assert manager.history_lengths()[3] == 3
    manager.materialize(np.array([3], np.int32))
    assert manager.pools.recurrent[:, 3].tobytes() == want[3][0].tobytes()


def test_counters_round_trip_and_reset(rng):
    config, manager = filled_ring(rng)
    h, p0 = manager.history_lengths(), manager.checkpoint_positions()
    assert h.dtype == np.int32 and p0.dtype == np.int64 and h.shape == p0.shape == (5,)
    h[:] = 9  # copies: writing them changes nothing
    assert manager.history_lengths().tolist() == [0, 5, 0, 3, 0]
    manager.set_positions(np.array([3, 0], np.int32), np.array([2**40, 11], np.int64))
    assert manager.history_lengths().tolist() == [0, 5, 0, 0, 0]
    assert manager.checkpoint_positions().tolist() == [11, 100, 5, 2**40, 3]
    state = main_pools(manager)
    bad = [
        (np.array([1], np.int64), np.array([0], np.int64), TypeError, "slots must have dtype int32"),
        (np.array([1], np.int32), np.array([0], np.int32), TypeError, "positions must have dtype int64"),
        ([1], np.array([0], np.int64), TypeError, "slots must be a host numpy.ndarray"),
        (np.array([5], np.int32), np.array([0], np.int64), ValueError, r"slots must be in \[0, 5\)"),
        (np.array([-2], np.int32), np.array([0], np.int64), ValueError, r"slots must be in \[0, 5\)"),  # -1 is padding
        (np.array([1, 1], np.int32), np.array([0, 1], np.int64), ValueError, "slots must be distinct"),
        (np.array([1, 2], np.int32), np.array([0, -1], np.int64), ValueError, "positions must be >= 0"),
        (np.array([1, 2], np.int32), np.array([0], np.int64), ValueError, "length of slots"),
        (np.array([[1]], np.int32), np.array([0], np.int64), ValueError, "1-D"),
    ]
    for slots, positions, error, message in bad:
        with pytest.raises(error, match=message):
            manager.set_positions(slots, positions)
        assert manager.history_lengths().tolist() == [0, 5, 0, 0, 0]
        assert manager.checkpoint_positions().tolist() == [11, 100, 5, 2**40, 3]
    after = main_pools(manager)
    assert all(after[kind].tobytes() == state[kind].tobytes() for kind in after)
    # h = 0 after restore_slot (p0 kept), clear_slot and clear_states (p0 = 0 too)
    recurrent, conv = manager.current_state(1)
    manager.restore_slot(1, recurrent, conv)
    assert manager.history_lengths()[1] == 0 and manager.checkpoint_positions()[1] == 100
    assert manager.pools.recurrent[:, 1].tobytes() == np.stack([a[0] for a in recurrent]).tobytes()
    manager.set_positions(np.array([1], np.int32), np.array([100], np.int64))
    values = window_values(config, rng, 2, 3)
    manager.reshape_intermediate_states(2, 3)
    write_ring(manager, values, [1, 4])
    manager.checkpoint_mtp_states(np.array([2, 1], np.int32), state_indices=np.array([1, 4], np.int32))
    assert manager.history_lengths().tolist() == [0, 2, 0, 0, 1]
    manager.clear_slot(1)
    assert manager.history_lengths().tolist() == [0, 0, 0, 0, 1] and manager.checkpoint_positions()[1] == 0
    assert not manager.pools.recurrent[:, 1].any()
    manager.clear_states()
    assert not manager.history_lengths().any() and not manager.checkpoint_positions().any()
    fresh = NumpyMambaCacheManager(config)
    assert not fresh.history_lengths().any() and not fresh.checkpoint_positions().any()


def test_checkpoint_mode_buffers_and_bytes():
    config = ckpt_config("mamba2", "float16", seq=3, ring=7, verify_writes_main_pool=True)
    assert config.verify_writes_main_pool is False
    manager = NumpyMambaCacheManager(config)
    assert manager.has_history() and not manager.has_replay_stash()
    assert not manager.has_intermediate_recurrent_states() and not manager.has_intermediate_conv_states()
    assert {k: v.shape for k, v in manager.get_history(1).items()} == {
        "dA": (5, 7, 4),
        "u": (5, 7, 4, 3),
        "B": (5, 7, 2, 5),
        "conv": (5, 7, 7),
    }
    assert manager.get_history(0)["conv"].dtype == np.float16 and manager.get_history(0)["u"].dtype == np.float32
    manager.reshape_intermediate_states(2, 2)
    assert manager.intermediate_shape == (2, 2)
    assert manager.get_history(0)["dA"].shape == (5, 7, 4)  # indexed by slot and ring step, never reinterpreted
    view = manager.get_history(1)["dA"]
    view[3, 2] = [1, 2, 3, 4]
    flat = manager._history["dA"][1].reshape(5 * 7, 4)
    assert flat[3 * 7 + 2].tolist() == [1, 2, 3, 4]
    ring_bytes = sum(a.nbytes for a in manager._history.values())
    counters = manager._history_lengths.nbytes + manager._checkpoint_positions.nbytes
    assert ring_bytes + counters == config.pool_bytes()["history"]
    per_step = 4 * 4 + 4 * 3 * 4 + 2 * 5 * 4 + 7 * 2
    assert config.pool_bytes()["history"] == 2 * 5 * 7 * per_step + 5 * 12
    assert config.pool_bytes()["replay_stash"] == 0 == config.pool_bytes()["intermediate_recurrent"]
    assert "history" in config.memory_table()
    with pytest.raises(ValueError, match="get_history"):
        manager.get_replay_stash(0)
    for getter in (manager.get_intermediate_recurrent_state, manager.get_intermediate_conv_state):
        with pytest.raises(ValueError, match="get_history"):
            getter(0)


# ---------------------------------------------------------------- 4. refusals
def test_other_commits_are_refused_in_checkpoint_mode_and_it_elsewhere(rng):
    config, manager = filled_ring(rng, "mamba2", "float32", False)
    state, h = main_pools(manager), manager.history_lengths()
    accept = np.array([1, 1, 1], np.int32)
    with pytest.raises(ValueError, match="checkpoint_mtp_states"):
        manager.scatter_mtp_states(accept)
    with pytest.raises(ValueError, match="checkpoint_mtp_states"):
        manager.replay_mtp_states(accept, positions=np.zeros(3, np.int32))
    for tree in (manager.scatter_accepted_tree_states, manager.replay_accepted_tree_states):
        with pytest.raises(ValueError, match="not contiguous in the history ring"):
            tree(np.zeros((3, 1), np.int32), accept)
    with pytest.raises(TypeError, match="PrefixStateCache"):
        manager.checkpoint_mtp_states(
            accept, store=object(), track_entries=np.zeros(3, np.int32), track_steps=np.zeros(3, np.int32)
        )
    with pytest.raises(ValueError, match="go together"):
        manager.checkpoint_mtp_states(accept, track_steps=np.zeros(3, np.int32))
    from mamba_cache.prefix import PrefixStateCache

    other_store = PrefixStateCache(NumpyMambaCacheManager(config), entries=2, block_size=4)
    steps = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="another manager"):
        manager.checkpoint_mtp_states(accept, store=other_store, track_entries=np.zeros(3, np.int32), track_steps=steps)
    store = PrefixStateCache(manager, entries=2, block_size=4)
    with pytest.raises(ValueError, match="not reserved"):
        manager.checkpoint_mtp_states(
            accept, store=store, track_entries=np.array([0, 1, -1], np.int32), track_steps=steps
        )
    entry = store.reserve()
    with pytest.raises(ValueError, match="track_entries must be distinct"):
        manager.checkpoint_mtp_states(accept, store=store, track_entries=np.array([entry, entry, -1], np.int32),
                                      track_steps=steps)  # fmt: skip
    after = main_pools(manager)
    assert all(after[k].tobytes() == state[k].tobytes() for k in after) and (manager.history_lengths() == h).all()
    for mode, instead in (("scatter", "scatter_mtp_states"), ("replay", "replay_mtp_states")):
        other = NumpyMambaCacheManager(ckpt_config(commit_mode=mode))
        with pytest.raises(ValueError, match=f"checkpoint_mtp_states needs.*use {instead}"):
            other.checkpoint_mtp_states(accept)
        for method in ("history_lengths", "checkpoint_positions"):
            with pytest.raises(ValueError, match="commit_mode='checkpoint'"):
                getattr(other, method)()
        with pytest.raises(ValueError, match="commit_mode='checkpoint'"):
            other.materialize(np.zeros(1, np.int32))
        with pytest.raises(ValueError, match="commit_mode='checkpoint'"):
            other.get_history(0)
        with pytest.raises(ValueError, match="commit_mode='checkpoint'"):
            other.set_positions(np.zeros(1, np.int32), np.zeros(1, np.int64))
        write_pool(other, "recurrent", rng.standard_normal(other.pools.recurrent.shape).astype(F32))
        recurrent, conv = other.current_state(4)  # the main pools' state in the other modes
        assert np.stack([a[0] for a in recurrent]).tobytes() == other.pools.recurrent[:, 4].tobytes()
        assert np.stack([a[0] for a in conv]).tobytes() == other.pools.conv[:, 4].tobytes()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(history_len=2), r"history_len must be >= max_intermediate_seq_len \(3\)"),
        (dict(history_len=0), r"history_len must be >= max_intermediate_seq_len \(3\)"),
        (dict(max_intermediate_seq_len=0, history_len=4), "max_intermediate_seq_len must be >= 1"),
        (dict(history_len=-1), "history_len must be 0 unless"),
        (dict(history_len=2.0), "history_len must be an integer"),
        (dict(commit_mode="replay", history_len=4), "history_len must be 0 unless commit_mode='checkpoint'"),
    ],
)
def test_history_len_is_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        ckpt_config(**fields)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=SIMULATOR_LONG)])
def test_prefix_store_keeps_the_folded_state_and_tracks_ring_steps(backend, rng):
    """insert stores the current (folded) state; restore sets p0 = length, h = 0; tracking stores ring step h + t."""
    from mamba_cache.prefix import PrefixStateCache

    config, (manager,) = filled_rings(rng, "mamba2", "bfloat16", True, backends=(backend,))
    store = PrefixStateCache(manager, entries=4, block_size=4)
    before, ring = main_pools(manager), {name: to_host(value) for name, value in manager._history.items()}
    want = current(manager, 1)
    handle = store.insert(np.arange(8), 1)
    entry_bits = [to_host(pool)[:, handle.entry] for pool in store.entry_pools]
    assert [bits.tobytes() for bits in entry_bits] == [state.tobytes() for state in want]  # not the checkpoint
    assert all(main_pools(manager)[k].tobytes() == before[k].tobytes() for k in before)  # the source stays
    assert all(to_host(value).tobytes() == ring[name].tobytes() for name, value in manager._history.items())
    assert manager.history_lengths()[1] == 5 and manager.checkpoint_positions()[1] == 100
    store.restore(handle, 2)
    assert manager.history_lengths().tolist() == [0, 5, 0, 3, 0] and manager.checkpoint_positions()[2] == 8
    assert [state.tobytes() for state in current(manager, 2)] == [state.tobytes() for state in want]
    store.restore_many([handle, handle], np.array([4, -1], np.int32))  # -1: padding
    assert manager.checkpoint_positions().tolist() == [7, 100, 8, 0, 8]
    # tracking: the state after ring step h + t of the committing slot, from the checkpoint before the commit
    entries = [store.reserve(), store.reserve()]
    values = window_values(config, rng, 3, 3)
    slots = np.array([1, 3, 0], np.int32)
    manager.reshape_intermediate_states(3, 3)
    write_ring(manager, values, slots)
    reference = NumpyMambaCacheManager(config)  # the reading reference on a host copy of the cache
    for kind in ("recurrent", "conv"):
        write_pool(reference, kind, main_pools(manager)[kind])
    for name, value in manager._history.items():
        reference._history[name][...] = to_host(value).view(reference._history[name].dtype)
    h, p0 = manager.history_lengths(), manager.checkpoint_positions()
    tracked = [(3, 1), (0, 0)]  # (slot, t): slot 3 folds (3 + 3 + 3 > 8), slot 0 does not
    wants = [
        state_after(
            config, reference.pools.recurrent, reference.pools.conv, reference._history, [s], [h[s] + t + 1], [p0[s]]
        )  # fmt: skip
        for s, t in tracked
    ]
    untouched = [to_host(pool)[:, handle.entry].tobytes() for pool in store.entry_pools]
    manager.checkpoint_mtp_states(
        np.array([2, 3, 1], np.int32),
        state_indices=slots,
        store=store,
        track_entries=np.array([handle.entry, entries[0], entries[1]], np.int32),
        track_steps=np.array([2, 1, 0], np.int32),  # row 0: t = 2 >= a = 2 tracks nothing
    )
    assert manager.history_lengths().tolist() == [1, 0, 0, 0, 0]  # slots 1 and 3 folded
    for entry, (rec, conv) in zip(entries, wants, strict=True):
        got = [to_host(pool)[:, entry].view(want[i].dtype) for i, pool in enumerate(store.entry_pools)]
        assert_close({"recurrent": got[0], "conv": got[1]}, {"recurrent": rec[:, 0], "conv": conv[:, 0]}, "bfloat16",
                     f"entry {entry}")  # fmt: skip
    assert [to_host(pool)[:, handle.entry].tobytes() for pool in store.entry_pools] == untouched


# ---------------------------------------------------------------- 5. the Numba backend against the reference
def assert_close(got, want, dtype, context):
    """Numba vs NumPy states within the replay commit's tolerance for ``dtype``; the same bits on the simulator."""
    for kind in want:
        a, b = got[kind].astype(np.float64), want[kind].astype(np.float64)
        np.testing.assert_allclose(a, b, **REPLAY_TOLERANCE[dtype], err_msg=f"{context}: {kind}")
        if not ON_GPU:  # the simulator runs NumPy's float32 arithmetic
            assert got[kind].tobytes() == want[kind].tobytes(), f"{context}: {kind} bits"


def current_dict(manager, slot):
    """`current` as ``{"recurrent": ..., "conv": ...}``."""
    return dict(zip(("recurrent", "conv"), current(manager, slot), strict=True))


def write_stash_any(manager, values):
    """`write_stash` for either backend (a Numba stash is written through a host copy)."""
    for layer in range(manager.num_layers()):
        for name, view in manager.get_replay_stash(layer).items():
            value = values[name][layer]
            if isinstance(view, np.ndarray):
                view[...] = value
            else:
                view.copy_to_device(np.ascontiguousarray(value).view(view.dtype))


#: The cases of the default run (the simulator runs a Gated DeltaNet fold's barriers thread by thread: slow).
NUMBA_FOLD_DEFAULT = {("mamba2", "bfloat16", True, 7), ("mamba2", "float16", False, 3)}
NUMBA_FOLD_CASES = [
    pytest.param(mixer, dtype, stochastic, ring, marks=() if case in NUMBA_FOLD_DEFAULT else SIMULATOR_LONG)
    for mixer in MIXERS
    for dtype, stochastic in [*PRECISIONS, ("float64", False)]
    for ring in (3, 7)
    for case in [(mixer, dtype, stochastic, ring)]
]


@pytest.mark.parametrize(("mixer", "dtype", "stochastic", "ring"), NUMBA_FOLD_CASES)
def test_numba_commit_folds_as_the_reference_and_as_its_replay_commit(rng, mixer, dtype, stochastic, ring):
    """Numba checkpoint commits == NumPy's (tolerance) with the same counters; R = S: its own replay commit's bits."""
    seq = 3
    config = ckpt_config(mixer, dtype, seq=seq, ring=ring, stochastic_rounding=stochastic)
    reference, numba = NumpyMambaCacheManager(config), BACKENDS["numba"](config)
    managers = [reference, numba]
    if ring == seq:
        replay_cfg = ckpt_config(mixer, dtype, seq=seq, commit_mode="replay", stochastic_rounding=stochastic)
        replay = BACKENDS["numba"](replay_cfg)
        managers.append(replay)
    random_main_pools(managers, config, rng)
    start = rng.integers(0, 10_000, config.max_batch_size).astype(np.int64)
    for manager in managers[:2]:
        manager.set_positions(np.arange(config.max_batch_size, dtype=np.int32), start)
    initial = main_pools(numba)
    slots = np.array([3, 0, 4, 1], dtype=np.int32)  # slot 2 is never named
    for window, (active, seq_len) in enumerate([(4, 3), (3, 2), (4, 3), (4, 1)]):
        accept = rng.integers(1, seq_len + 1, active).astype(np.int32)
        accept[window % active] = [0, INT32_MIN, seq_len + 1, -1][window]  # a padding row
        accept[(window + 1) % active] = seq_len  # a full accept
        values = window_values(config, rng, active, seq_len)
        positions = numba.checkpoint_positions()[slots[:active]].astype(np.int32)
        for manager in managers:
            manager.reshape_intermediate_states(active, seq_len)
        for manager in managers[:2]:
            write_ring(manager, values, slots[:active])
            manager.checkpoint_mtp_states(accept, state_indices=slots[:active])
        context = f"window {window}, accept {accept.tolist()}"
        assert numba.history_lengths().tolist() == reference.history_lengths().tolist(), context
        assert numba.checkpoint_positions().tolist() == reference.checkpoint_positions().tolist(), context
        got = main_pools(numba)
        assert_close(got, main_pools(reference), dtype, context)
        for kind in got:
            assert got[kind][:, 2].tobytes() == initial[kind][:, 2].tobytes(), f"{context}: untouched slot 2"
        if ring == seq:  # a fold at every commit: the replay commit's bits, call for call
            write_stash_any(replay, values)
            replay.replay_mtp_states(accept, state_indices=slots[:active], positions=positions)
            want = main_pools(replay)
            assert all(got[kind].tobytes() == want[kind].tobytes() for kind in got), f"{context}: != replay"
    assert (numba.checkpoint_positions() > start).sum() >= 2  # folds happened
    for slot in (1, 2, 3):  # the current states (R = 7: some slots hold unfolded steps)
        assert_close(current_dict(numba, slot), current_dict(reference, slot), dtype, f"slot {slot}")


@pytest.mark.parametrize(
    ("mixer", "dtype", "stochastic"),
    [("mamba2", "bfloat16", True), pytest.param("gdn", "bfloat16", True, marks=SIMULATOR_LONG)],
)
def test_numba_reads_copies_and_materialize_as_the_reference(rng, mixer, dtype, stochastic):
    """Capture, copy_slots and materialize on Numba give NumPy's states and counters; the sources stay as they were."""
    config, (reference, numba) = filled_rings(rng, mixer, dtype, stochastic, backends=("numpy", "numba"))
    kinds = ("recurrent", "conv")
    want = current_dict(reference, 1)
    before = main_pools(numba)
    ring = {name: to_host(value) for name, value in numba._history.items()}
    captured = current_dict(numba, 1)
    assert_close(captured, want, dtype, "current_state")
    assert captured["recurrent"].tobytes() != before["recurrent"][:, 1].tobytes()  # the ring matters
    assert to_host(numba.capture_recurrent_states(1)[1]).tobytes() == captured["recurrent"][1:2].tobytes()
    outs = (cuda.device_array_like(numba.pools.recurrent[:, :1]), cuda.device_array_like(numba.pools.conv[:, :1]))
    numba.capture_states(1, out=outs)
    assert all(to_host(out).tobytes() == captured[kind].tobytes() for out, kind in zip(outs, kinds, strict=True))
    for manager in (reference, numba):
        manager.copy_slots(np.array([1, 1, -1], np.int32), np.array([2, 4, 0], np.int32))
    after = main_pools(numba)
    for kind in kinds:  # the source's checkpoint and ring are unchanged, the padding pair's destination too
        assert after[kind][:, 1].tobytes() == before[kind][:, 1].tobytes()
        assert after[kind][:, 0].tobytes() == before[kind][:, 0].tobytes()
        for slot in (2, 4):
            assert after[kind][:, slot].tobytes() == captured[kind].tobytes(), (kind, slot)
    assert all(to_host(value).tobytes() == ring[name].tobytes() for name, value in numba._history.items())
    for manager in (reference, numba):
        manager.materialize(np.array([1, 0, -1, 7], np.int32))
    assert numba.history_lengths().tolist() == reference.history_lengths().tolist() == [0, 0, 0, 3, 0]
    assert numba.checkpoint_positions().tolist() == reference.checkpoint_positions().tolist()
    assert_close(main_pools(numba), main_pools(reference), dtype, "after materialize")
    folded = main_pools(numba)
    for kind in kinds:
        assert folded[kind][:, 1].tobytes() == captured[kind].tobytes()  # the fold's bits are the read's


@pytest.mark.parametrize(
    ("mixer", "dtype", "stochastic"),
    [("mamba2", "bfloat16", True), ("gdn", "float16", False)],
)
def test_numba_reading_functions_give_the_reference_state_after(rng, mixer, dtype, stochastic):
    """``checkpoint.reading.states_after`` (the device functions a model's kernel calls) == NumPy ``state_after``."""
    from mamba_cache.checkpoint.reading import states_after

    config, (reference, numba) = filled_rings(rng, mixer, dtype, stochastic, backends=("numpy", "numba"))
    slots, steps = np.array([1, 3, 4, 0], np.int32), np.array([5, 2, 0, 8], np.int32)  # up to R, past h too
    p0 = reference.checkpoint_positions()[slots]
    pools = reference.pools
    want_rec, want_conv = state_after(config, pools.recurrent, pools.conv, reference._history, slots, steps, p0)
    args = [cuda.to_device(a) for a in (slots, steps, p0)]
    for layer in range(config.num_recurrent_layers):
        got_rec, got_conv = states_after(
            config,
            numba.get_recurrent_state(layer),
            numba.get_conv_state(layer),
            numba.get_history(layer),
            *args,
            layer,
        )
        got = {"recurrent": to_host(got_rec), "conv": to_host(got_conv)}
        got = {kind: value.view(getattr(config, f"{kind}_state_dtype")) for kind, value in got.items()}
        want = {"recurrent": want_rec[layer], "conv": want_conv[layer]}
        assert_close(got, want, dtype, f"layer {layer}")
    assert want_rec[:, 0].tobytes() != pools.recurrent[:, 1].tobytes()  # five ring steps moved the state


@needs_gpu
@pytest.mark.parametrize("mixer", MIXERS)
def test_gpu_checkpoint_commit_captures_into_a_cuda_graph(rng, mixer):
    """The commit (counters and fold) captured once on a stream, replayed with new accept lengths: NumPy's results."""
    from cuda.bindings import driver

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    config = ckpt_config(mixer, "bfloat16", seq=3, ring=7, stochastic_rounding=True)
    reference, numba = NumpyMambaCacheManager(config), BACKENDS["numba"](config)
    random_main_pools([reference, numba], config, rng)
    slots = np.array([3, 0, 4, 1], np.int32)
    stream = cuda.stream()
    accept = cuda.to_device(np.zeros(4, np.int32), stream=stream)
    indices = cuda.to_device(slots, stream=stream)
    for manager in (reference, numba):
        manager.reshape_intermediate_states(4, 3)
    numba.checkpoint_mtp_states(accept, stream, state_indices=indices)  # prepares the launches (all rows a = 0)
    stream.synchronize()
    handle = int(stream.handle)
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    numba.checkpoint_mtp_states(accept, stream, state_indices=indices)
    graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    for window in range(3):  # every named slot folds at least once, one holds steps after
        values = window_values(config, rng, 4, 3)
        write_ring(reference, values, slots)
        write_ring(numba, values, slots)
        lengths = np.array([[3, 1, 0, 2], [2, 3, 3, 1], [3, 2, 2, 3]][window], np.int32)
        reference.checkpoint_mtp_states(lengths, state_indices=slots)
        accept.copy_to_device(lengths, stream=stream)
        check(driver.cuGraphLaunch(graph, handle))
        stream.synchronize()
        assert numba.history_lengths().tolist() == reference.history_lengths().tolist(), window
        assert numba.checkpoint_positions().tolist() == reference.checkpoint_positions().tolist(), window
        assert_close(main_pools(numba), main_pools(reference), "bfloat16", f"window {window}")
    assert numba.checkpoint_positions()[2] == 0 and (numba.checkpoint_positions()[slots] > 0).all()  # 2: never named
