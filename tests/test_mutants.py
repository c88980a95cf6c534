"""Cases a mutation run of the checks and kernels found untested (``.ci/mutate.py`` keeps it so).

Each test here fails for at least one one-line mutant of ``core/manager.py``,
``core/numpy_backend.py``, ``core/kernels.py`` or ``snapshot.py`` that the rest of the suite let
through; docs/development.md lists the mutants and the score.
"""

import io
import json

import numpy as np
import pytest
from helpers import BACKENDS, assert_same_bits, fill_random, small_config, snapshot, to_host

from mamba_cache import NumbaMambaCacheManager, NumpyMambaCacheManager
from mamba_cache.core.kernels import WORDS_PER_THREAD, launch_shape
from mamba_cache.snapshot import SnapshotError, load_snapshot

INT32 = np.int32


def refused_and_unchanged(manager, call, exc, msg):
    before, shape = snapshot(manager), manager.intermediate_shape
    with pytest.raises(exc, match=msg):
        call(manager)
    assert_same_bits(snapshot(manager), before, msg)
    assert manager.intermediate_shape == shape


@pytest.mark.parametrize("tree", [False, True], ids=["scatter", "tree"])
def test_state_indices_longer_than_accept_lengths_is_refused(backend, rng, tree):
    manager = BACKENDS[backend](small_config())
    fill_random([manager], rng)
    accept, indices = np.array([1, 2], INT32), np.array([0, 1, 2], INT32)
    if tree:
        nodes = np.array([[0], [1]], INT32)

        def call(m):
            return m.scatter_accepted_tree_states(nodes, accept, indices)
    else:

        def call(m):
            return m.scatter_mtp_states(accept, state_indices=indices)

    refused_and_unchanged(
        manager, call, ValueError, r"state_indices must have the length of accept_lengths \(2\), got 3"
    )


def test_accept_lengths_one_past_the_view_is_refused(backend, rng):
    manager = BACKENDS[backend](small_config())
    manager.reshape_intermediate_states(2, 3)
    fill_random([manager], rng)

    def call(m):
        return m.scatter_mtp_states(np.array([1, 1, 1], INT32))

    refused_and_unchanged(manager, call, ValueError, r"accept_lengths must have length in \[0, 2\].*got 3")
    manager.scatter_mtp_states(np.array([1, 1], INT32))  # the full view is allowed


def test_non_contiguous_device_state_is_refused_by_restore_slot(rng):
    from numba import cuda

    config = small_config()
    manager = NumbaMambaCacheManager(config)
    fill_random([manager], rng)
    H, D, N = config.recurrent_state_shape[1:]
    wide = cuda.to_device(np.ones((1, H, D, 2 * N), np.float32))
    strided = wide[:, :, :, ::2]  # [1, H, D, N], every other element
    assert strided.shape == (1, H, D, N) and not strided.is_c_contiguous()

    def call(m):
        return m.restore_slot(1, [strided], [])

    refused_and_unchanged(manager, call, ValueError, r"recurrent_states\[0\] must be contiguous")


@pytest.mark.parametrize(
    ("key", "msg"),
    [
        ("sha256", "its metadata lacks sha256"),
        ("config", "its metadata lacks config"),
        ("layers", "not a readable mamba_cache snapshot"),
    ],
)
def test_snapshot_meta_missing_a_key_is_refused(backend, rng, key, msg, tmp_path):
    source = NumpyMambaCacheManager(small_config())
    fill_random([source], rng)
    buffer = io.BytesIO()
    source.save_slot(buffer, 2)
    buffer.seek(0)
    with np.load(buffer) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    del meta[key]
    path = tmp_path / f"no-{key}.npz"
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(SnapshotError, match=msg):
        load_snapshot(path, small_config())
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    refused_and_unchanged(cache, lambda m: m.load_slot(path, 0), SnapshotError, msg)


# Slots of more than two chunks: 2100 8-byte words of recurrent state, 3 chunks of 256 * 4 words,
# so the chunk stride is exercised under the simulator too (one layer, two rows: the simulator runs
# every one of the 256 threads of a block in Python).
def big_slot_config():
    return small_config(
        num_recurrent_layers=1,
        max_batch_size=2,
        recurrent_state_num_heads=1,
        recurrent_state_head_dim=7,
        recurrent_state_size=300,
        max_intermediate_seq_len=2,
        recurrent_state_dtype="float64",
    )


def test_big_slot_config_spans_more_than_two_chunks():
    config = big_slot_config()
    (rec_chunks, conv_chunks), threads = launch_shape(
        7 * 300, config.conv_slot_elems
    )  # conv: 21 float16 = 21 u16 words
    assert (rec_chunks, conv_chunks, threads) == (3, 1, 256)
    assert 7 * 300 > 2 * threads * WORDS_PER_THREAD
    assert config.recurrent_state_shape[1:] == (1, 7, 300)


def test_parity_on_slots_of_more_than_two_chunks(rng):
    config = big_slot_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    for manager in (ref, dev):
        manager.reshape_intermediate_states(2, 2)
    fill_random([ref, dev], rng)

    def check(what):
        assert_same_bits(snapshot(ref), snapshot(dev), what)

    accept, indices = np.array([2, 1], INT32), np.array([1, 0], INT32)
    ref.scatter_mtp_states(accept, state_indices=indices)
    dev.scatter_mtp_states(accept, state_indices=indices)
    check("scatter")
    fill_random([ref, dev], rng)
    nodes, tree_accept = np.array([[1, 0], [0, -1]], INT32), np.array([1, 1], INT32)
    ref.scatter_accepted_tree_states(nodes, tree_accept)
    dev.scatter_accepted_tree_states(nodes, tree_accept)
    check("tree")
    ref.clear_slot(0)
    dev.clear_slot(0)
    check("clear_slot")
    for kind in ("recurrent", "conv"):
        want = getattr(ref, f"capture_{kind}_states")(1)
        got = getattr(dev, f"capture_{kind}_states")(1)
        assert len(want) == len(got) == 1
        for a, b in zip(want, got, strict=True):
            assert a.tobytes() == to_host(b).tobytes(), kind


@pytest.mark.parametrize("tree", [False, True], ids=["scatter", "tree"])
def test_two_committing_rows_naming_one_slot_are_refused(rng, tree):
    """The reference refuses a commit with no defined winner (the GPU's would be a race)."""
    manager = NumpyMambaCacheManager(small_config())
    fill_random([manager], rng)

    def commit(m, accept, indices):
        if tree:
            m.scatter_accepted_tree_states(np.maximum(accept - 1, 0)[:, None], accept, indices)
        else:
            m.scatter_mtp_states(accept, state_indices=indices)

    msg = "committing rows must name distinct slots; slot 3 is named by 2 rows"
    accept = np.array([1, 2, 1], INT32)
    refused_and_unchanged(manager, lambda m: commit(m, accept, np.array([3, 0, 3], INT32)), ValueError, msg)
    # a row that does not commit (accept 0) may share its slot; so may a skipped out-of-range slot
    before = snapshot(manager)
    commit(manager, np.array([1, 0, 1], INT32), np.array([3, 0, 0], INT32))
    assert (snapshot(manager)["recurrent"] != before["recurrent"]).any()
    commit(manager, np.array([1, 1, 1], INT32), np.array([7, 7, 2], INT32))
