"""``pad_slot_id`` (-1) in any int32 array of slots or entries: the row reads, writes and tracks nothing.

Every multi-row call is run twice on twin managers (same random bits everywhere): once with padding
rows mixed in, each padding row otherwise live (a valid accept length, a reserved entry and a step
to track), and once as the reference call without them (the padding rows dropped, or made inert
through another argument). Every buffer must come out bit-identical: the main pools, the per-step
buffers, the replay stash, the checkpoint ring and counters, and the prefix store's entries.
Single-slot calls keep refusing -1 with ``IndexError``.
"""

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    SIMULATOR_LONG,
    assert_same_bits,
    device_int32,
    fill_random,
    fill_store,
    needs_gpu,
    replay_config,
    small_config,
    snapshot,
    stash_values,
    store_snapshot,
    to_host,
    write_pool,
)

from mamba_cache import PrefixStateCache, pad_slot_id

PAD = pad_slot_id


def everything(manager, store=None) -> dict:
    """Host copies of every buffer a call could touch (pools, stash, ring, counters, store entries)."""
    state = snapshot(manager)
    for name, pool in {**manager._stash, **{f"ring_{k}": v for k, v in manager._history.items()}}.items():
        state[name] = to_host(pool)
    if manager._history:
        state["h"], state["p0"] = manager.history_lengths(), manager.checkpoint_positions()
    if store is not None:
        state.update(store_snapshot(store))
    return state


def twins(backend, rng, config, entries=0):
    """Two managers (and prefix stores of ``entries``) holding the same random bits in every buffer."""
    managers = [BACKENDS[backend](config) for _ in range(2)]
    fill_random(managers, rng)
    if config.commit_mode != "scatter":  # states a recurrence runs on: finite values
        for kind in ("recurrent", "conv"):
            values = rng.standard_normal(getattr(managers[0].pools, kind).shape)
            for manager in managers:
                write_pool(manager, kind, values.astype(getattr(config, f"{kind}_state_dtype")))
    steps = config.max_batch_size * max(config.max_intermediate_seq_len, config.history_len)
    values = {
        name: v.reshape(config.num_recurrent_layers, -1) for name, v in stash_values(config, rng, (steps,)).items()
    }
    for manager in managers:
        for name, pool in {**manager._stash, **manager._history}.items():
            if isinstance(pool, np.ndarray):
                pool[...] = values[name][:, : pool.shape[1]]
            else:
                pool.copy_to_device(np.ascontiguousarray(values[name][:, : pool.shape[1]]))
    if config.commit_mode == "checkpoint":
        h = rng.integers(0, config.history_len - config.max_intermediate_seq_len + 1, config.max_batch_size)
        p0 = rng.integers(0, 100, config.max_batch_size)
        for manager in managers:
            manager.set_positions(np.arange(config.max_batch_size, dtype=np.int32), p0)
            manager._history_lengths[...] = h.astype(np.int32)
    stores = []
    if entries:
        stores = [
            PrefixStateCache(m, entries=entries, block_size=max(1, config.max_intermediate_seq_len)) for m in managers
        ]
        fill_store(stores[0], rng)
        for pool, twin in zip(stores[0].entry_pools, stores[1].entry_pools, strict=True):
            host = to_host(pool)
            if isinstance(twin, np.ndarray):
                twin[...] = host
            else:
                twin.copy_to_device(host)
    return managers, stores


def same(pair, stores=(None, None), context=""):
    assert_same_bits(everything(pair[0], stores[0]), everything(pair[1], stores[1]), context)


SCATTER = small_config(max_batch_size=6, num_recurrent_layers=2, recurrent_state_head_dim=2, conv_dim=5)


def test_copy_slots_skips_padding_pairs(backend, rng):
    (padded, plain), _ = twins(backend, rng, SCATTER)
    before = everything(padded)
    i32 = lambda values: device_int32(backend, values)  # noqa: E731
    padded.copy_slots(i32([0, PAD, 2, 3]), i32([4, 1, PAD, 5]))
    plain.copy_slots(i32([0, 3]), i32([4, 5]))
    same((padded, plain), context="copy_slots")
    assert everything(padded)["recurrent"][:, 1].tobytes() == before["recurrent"][:, 1].tobytes()


#: The converting commit kernels too: float32 per-step states stored into a float16 pool.
CONVERTING = small_config(
    max_batch_size=6, num_recurrent_layers=2, recurrent_state_head_dim=2, conv_dim=5,
    recurrent_state_dtype="float16", intermediate_recurrent_state_dtype="float32",
)  # fmt: skip


@pytest.mark.parametrize("kind", ["scatter", "tree", "converting"])
def test_scatter_and_tree_padding_rows_commit_and_track_nothing(backend, rng, kind):
    config = CONVERTING if kind == "converting" else SCATTER
    (padded, plain), stores = twins(backend, rng, config, entries=6)
    for m in (padded, plain):
        m.reshape_intermediate_states(5, 3)
    i32 = lambda values: device_int32(backend, values)  # noqa: E731
    accept, slots = [2, 3, 1, 2, 3], [4, PAD, 0, PAD, 7]  # row 4: out of range but not padding
    live = [1, 0, 1, 0, 1]  # the reference: padding rows accept nothing and track nothing
    if kind == "tree":
        nodes = i32([[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [1, 0, 2]])
        padded.scatter_accepted_tree_states(nodes, i32(accept), i32(slots))
        plain.scatter_accepted_tree_states(nodes, i32([a * ok for a, ok in zip(accept, live, strict=True)]), i32(slots))
        same((padded, plain), context="tree")
        return
    entries = [[s.reserve() for _ in range(5)] for s in stores]
    assert entries[0] == entries[1]
    steps = [0, 1, 0, 0, 1]
    padded.scatter_mtp_states(
        i32(accept), state_indices=i32(slots), store=stores[0], track_entries=i32(entries[0]), track_steps=i32(steps)
    )
    plain.scatter_mtp_states(
        i32([a * ok for a, ok in zip(accept, live, strict=True)]),
        state_indices=i32(slots),
        store=stores[1],
        track_entries=i32(entries[1]),
        track_steps=i32([t if ok else -1 for t, ok in zip(steps, live, strict=True)]),
    )
    same((padded, plain), stores, "tracked scatter")
    # a padding entry tracks nothing either
    padded.scatter_mtp_states(
        i32([0, 0, 2, 0, 0]), state_indices=i32([PAD, PAD, 1, PAD, PAD]), store=stores[0],
        track_entries=i32([PAD] * 5), track_steps=i32([0] * 5),
    )  # fmt: skip
    plain.scatter_mtp_states(i32([0, 0, 2]), state_indices=i32([PAD, PAD, 1]))
    same((padded, plain), stores, "padding entries")


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_replay_padding_rows_commit_and_track_nothing(backend, rng, mixer):
    config = replay_config(mixer, max_batch_size=4, num_recurrent_layers=1, max_intermediate_seq_len=3)
    (padded, plain), stores = twins(backend, rng, config, entries=4)
    for m in (padded, plain):
        m.reshape_intermediate_states(4, 3)
    i32 = lambda values: device_int32(backend, values)  # noqa: E731
    entries = [[s.reserve() for _ in range(4)] for s in stores]
    accept, slots, steps = [2, 3, 1, 2], [PAD, 2, PAD, 0], [0, 1, 0, 1]
    padded.replay_mtp_states(
        i32(accept), state_indices=i32(slots), store=stores[0], track_entries=i32(entries[0]), track_steps=i32(steps)
    )
    plain.replay_mtp_states(
        i32([0, 3, 0, 2]), state_indices=i32(slots), store=stores[1], track_entries=i32(entries[1]),
        track_steps=i32([-1, 1, -1, 1]),
    )  # fmt: skip
    same((padded, plain), stores, "replay")


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=SIMULATOR_LONG)])
def test_checkpoint_mode_padding_rows(backend, rng):
    """Checkpoint mode: commit, materialize, copy and positions skip padding rows (host index arrays)."""
    config = replay_config(max_batch_size=5, commit_mode="checkpoint", history_len=6, max_intermediate_seq_len=2)
    (padded, plain), _ = twins(backend, rng, config)
    for m in (padded, plain):
        m.reshape_intermediate_states(4, 2)
    i32 = lambda values: np.array(values, dtype=np.int32)  # noqa: E731
    padded.checkpoint_mtp_states(i32([2, 1, 2, 1]), state_indices=i32([PAD, 3, PAD, 1]))
    plain.checkpoint_mtp_states(i32([0, 1, 0, 1]), state_indices=i32([PAD, 3, PAD, 1]))
    same((padded, plain), context="checkpoint_mtp_states")
    padded.materialize(i32([PAD, 2, PAD]))
    plain.materialize(i32([2]))
    same((padded, plain), context="materialize")
    padded.copy_slots(i32([PAD, 0]), i32([4, PAD]))
    same((padded, plain), context="folded copy_slots")
    padded.set_positions(i32([PAD, 1, PAD]), np.array([-5, 7, 9]))
    plain.set_positions(i32([1]), np.array([7]))
    same((padded, plain), context="set_positions")


def test_prefix_insert_and_restore_many_skip_padding(backend, rng):
    (padded, plain), stores = twins(backend, rng, SCATTER, entries=4)
    tokens = [rng.integers(0, 100, 4 * (i + 1)) for i in range(3)]
    handles = stores[0].insert_many(tokens, np.array([1, PAD, 3], dtype=np.int32))
    assert handles[1] is None
    reference = stores[1].insert_many([tokens[0], tokens[2]], np.array([1, 3], dtype=np.int32))
    assert [handles[0], handles[2]] == reference
    assert stores[0].match(np.concatenate([tokens[1], [1]])) is None  # the padding row keyed nothing
    same((padded, plain), stores, "insert_many")
    i32 = lambda values: device_int32(backend, values)  # noqa: E731
    stores[0].restore_many([handles[0], handles[2], handles[0]], i32([PAD, 0, PAD]))
    stores[1].restore_many([reference[1]], i32([0]))
    same((padded, plain), stores, "restore_many")


def test_single_slot_calls_refuse_padding(backend, rng):
    (manager, _), stores = twins(backend, rng, SCATTER, entries=2)
    before = everything(manager, stores[0])
    handle = stores[0].insert(rng.integers(0, 100, 4), 0)
    before = everything(manager, stores[0])
    calls = [
        lambda: manager.capture_recurrent_states(PAD),
        lambda: manager.capture_conv_states(PAD),
        lambda: manager.clear_slot(PAD),
        lambda: manager.current_state(PAD),
        lambda: stores[0].restore(handle, PAD),
        lambda: stores[0].insert(rng.integers(0, 100, 8), PAD),
    ]
    for call in calls:
        with pytest.raises(IndexError, match=r"must be in \[0, 6\), got -1"):
            call()
    assert_same_bits(everything(manager, stores[0]), before, "refused single-slot calls")


@needs_gpu
def test_padding_rows_under_cuda_graph_capture(rng):
    """A captured copy + tracked scatter replayed with padding rows (-1) in every index array equals the reference."""
    from cuda.bindings import driver
    from numba import cuda

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1] if len(result) == 2 else None

    (ref, _), ref_stores = twins("numpy", rng, SCATTER, entries=6)
    (dev, _), dev_stores = twins("numba", rng, SCATTER, entries=6)
    stream, rows = cuda.stream(), 4
    arrays = {
        k: cuda.to_device(np.full(rows, PAD, np.int32), stream=stream) for k in ("src", "dst", "acc", "idx", "e", "t")
    }
    for m in (ref, dev):
        m.reshape_intermediate_states(rows, 3)
    entries = [dev_stores[0].reserve() for _ in range(rows)]
    assert [ref_stores[0].reserve() for _ in range(rows)] == entries

    def calls():
        dev.copy_slots(arrays["src"], arrays["dst"], stream=stream)
        dev.scatter_mtp_states(
            arrays["acc"], stream=stream, state_indices=arrays["idx"], store=dev_stores[0],
            track_entries=arrays["e"], track_steps=arrays["t"],
        )  # fmt: skip

    calls()
    stream.synchronize()
    handle = int(stream.handle)
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    calls()
    graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    for _ in range(3):
        fill_random([ref, dev], rng)
        for pool, ref_pool in zip(dev_stores[0].entry_pools, ref_stores[0].entry_pools, strict=True):
            ref_pool[...] = to_host(pool)
        perm = rng.permutation(SCATTER.max_batch_size)
        values = {
            "src": [int(perm[0]), PAD, int(perm[1]), PAD],
            "dst": [int(perm[2]), int(perm[3]), PAD, PAD],
            "acc": rng.integers(1, 4, size=rows).tolist(),
            "idx": [int(perm[4]), PAD, int(perm[5]), PAD],
            "e": [entries[0], entries[1], PAD, entries[3]],
            "t": [0, 0, 0, 0],
        }
        for name, v in values.items():
            arrays[name].copy_to_device(np.asarray(v, np.int32), stream=stream)
        check(driver.cuGraphLaunch(graph, handle))
        stream.synchronize()
        i32 = {name: np.asarray(v, np.int32) for name, v in values.items()}
        ref.copy_slots(i32["src"], i32["dst"])
        ref.scatter_mtp_states(
            i32["acc"], state_indices=i32["idx"], store=ref_stores[0], track_entries=i32["e"], track_steps=i32["t"]
        )
        same((ref, dev), (ref_stores[0], dev_stores[0]), f"graph replay {values}")
