"""Slot operations, slot indirection, verify modes and tree commits, on both backends.

Each expectation is written here row by row from the documented rule, independently of the NumPy
backend's vectorised code, and every byte of every pool is compared.
"""

import numpy as np
import pytest
from helpers import BACKENDS, assert_same_bits, device_int32, fill_random, small_config, snapshot

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def make(backend, **overrides):
    return BACKENDS[backend](small_config(**overrides))


def commit(expected, before, row, slot, step, seq_len):
    """Copy intermediate (row, step) of every layer into ``slot`` of both main pools."""
    for kind in ("recurrent", "conv"):
        pool, inter = expected[kind], before[f"intermediate_{kind}"]
        elems = pool[0, 0].size
        for layer in range(pool.shape[0]):
            start = (row * seq_len + step) * elems
            pool[layer, slot] = inter[layer, start : start + elems].reshape(pool.shape[2:])


def expected_linear(before, accept, indices, seq_len, writes_main_pool=True, slots=5):
    expected = {k: v.copy() for k, v in before.items()}
    limit = seq_len - 1 if writes_main_pool else seq_len
    for row, a in enumerate(accept):
        slot = row if indices is None else int(indices[row])
        if 1 <= a <= limit and 0 <= slot < slots:
            commit(expected, before, row, slot, int(a) - 1, seq_len)
    return expected


def expected_tree(before, nodes, accept, indices, seq_len, slots=5):
    expected = {k: v.copy() for k, v in before.items()}
    for row, a in enumerate(accept):
        considered = [int(n) for n in nodes[row][: max(0, min(int(a), nodes.shape[1]))] if n >= 0]
        slot = row if indices is None else int(indices[row])
        if considered and considered[-1] < seq_len and 0 <= slot < slots:
            commit(expected, before, row, slot, considered[-1], seq_len)
    return expected


# ---------------------------------------------------------------- clear_slot / restore_slot
def test_clear_slot_zeroes_one_slot_of_every_layer(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.clear_slot(3)
    after = snapshot(cache)
    for kind in ("recurrent", "conv"):
        assert not after[kind][:, 3].any()
        mask = np.ones(5, bool)
        mask[3] = False
        assert after[kind][:, mask].tobytes() == before[kind][:, mask].tobytes()
    for kind in ("intermediate_recurrent", "intermediate_conv"):
        assert after[kind].tobytes() == before[kind].tobytes()


def test_restore_slot_round_trips_a_capture(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    rec, conv = cache.capture_recurrent_states(1), cache.capture_conv_states(1)
    want = snapshot(cache)
    fill_random([cache], rng)  # overwrite everything
    before = snapshot(cache)
    cache.restore_slot(4, rec, conv)
    after = snapshot(cache)
    for kind in ("recurrent", "conv"):
        assert after[kind][:, 4].tobytes() == want[kind][:, 1].tobytes()
        assert after[kind][:, :4].tobytes() == before[kind][:, :4].tobytes()


def test_restore_slot_zero_fills_missing_layers(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    rec = cache.capture_recurrent_states(0)
    want = snapshot(cache)
    cache.restore_slot(2, rec[:1], [])
    after = snapshot(cache)
    assert after["recurrent"][0, 2].tobytes() == want["recurrent"][0, 0].tobytes()
    assert not after["recurrent"][1:, 2].any() and not after["conv"][:, 2].any()


def test_restore_slot_refusals_change_nothing(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    rec, conv = cache.capture_recurrent_states(0), cache.capture_conv_states(0)
    other = BACKENDS["numpy" if backend == "numba" else "numba"](small_config())
    foreign = other.capture_recurrent_states(0)
    wrong_dtype = make(backend, recurrent_state_dtype="float64").capture_recurrent_states(0)
    wrong_shape = make(backend, recurrent_state_size=6).capture_recurrent_states(0)
    before = snapshot(cache)
    cases = [
        (lambda: cache.restore_slot(5, rec, conv), IndexError, r"slot must be in \[0, 5\), got 5"),
        (
            lambda: cache.restore_slot(0, rec + rec[:1], conv),
            ValueError,
            "recurrent_states has 4 arrays but the cache has 3 layers",
        ),
        (lambda: cache.restore_slot(0, rec, "conv"), TypeError, "conv_states must be a list of per-layer arrays"),
        (lambda: cache.restore_slot(0, wrong_dtype, conv), TypeError, r"recurrent_states\[0\] must have dtype float32"),
        (
            lambda: cache.restore_slot(0, wrong_shape, conv),
            ValueError,
            r"recurrent_states\[0\] must have shape \[1, 2, 3, 5\]",
        ),
        (lambda: cache.restore_slot(0, foreign, conv), TypeError, r"recurrent_states\[0\] must be a"),
        (
            lambda: cache.restore_slot(0, rec, conv[:2] + [rec[0]]),
            TypeError,
            r"conv_states\[2\] must have dtype float16",
        ),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
        assert_same_bits(snapshot(cache), before, msg)


def test_clear_slot_bad_slot(backend):
    cache = make(backend)
    with pytest.raises(IndexError, match=r"slot must be in \[0, 5\), got -1"):
        cache.clear_slot(-1)
    with pytest.raises(TypeError, match="slot must be an integer"):
        cache.clear_slot(1.0)


# ---------------------------------------------------------------- slot indirection
@pytest.mark.parametrize(
    ("accept", "indices"),
    [
        ([2, 3, 1, 4, 0], [4, 3, 2, 1, 0]),  # a permutation
        ([2, 2, 2], [0, -1, 5]),  # out-of-range slots skip their row
        ([0, 3, -5, 2], [1, 0, 3, 2]),  # padding rows never overwrite slot 1 or 3
        ([3, 1], [INT32_MIN, INT32_MAX]),
    ],
)
def test_state_indices_redirect_rows(backend, rng, accept, indices):
    cache = make(backend)
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.scatter_mtp_states(device_int32(backend, accept), state_indices=device_int32(backend, indices))
    assert_same_bits(snapshot(cache), expected_linear(before, accept, indices, 4), f"{accept} -> {indices}")


def test_state_indices_must_match_accept_lengths(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"state_indices must have the length of accept_lengths \(3\), got 2"):
        cache.scatter_mtp_states(device_int32(backend, [1, 2, 3]), state_indices=device_int32(backend, [0, 1]))
    with pytest.raises(TypeError, match="state_indices must have dtype int32, got int64"):
        cache.scatter_mtp_states(device_int32(backend, [1, 2]), state_indices=np.array([0, 1], np.int64))
    assert_same_bits(snapshot(cache), before, "refused")


# ---------------------------------------------------------------- verify modes
@pytest.mark.parametrize("seq_len", [1, 2, 4])
def test_read_only_main_pool_commits_full_accepts(backend, rng, seq_len):
    cache = make(backend, verify_writes_main_pool=False)
    fill_random([cache], rng)
    cache.reshape_intermediate_states(5, seq_len)
    before = snapshot(cache)
    accept = [seq_len, seq_len - 1, seq_len + 1, 1, 0]
    cache.scatter_mtp_states(device_int32(backend, accept))
    want = expected_linear(before, accept, None, seq_len, writes_main_pool=False)
    assert_same_bits(snapshot(cache), want, "read-only main pool")
    if seq_len >= 1:  # row 0 is a full accept: it commits step V - 1
        assert snapshot(cache)["recurrent"][:, 0].tobytes() != before["recurrent"][:, 0].tobytes()


def test_verify_mode_must_be_a_bool():
    from mamba_cache import ConfigError

    with pytest.raises(ConfigError, match="verify_writes_main_pool must be a bool, got 1"):
        small_config(verify_writes_main_pool=1)


# ---------------------------------------------------------------- tree commits
@pytest.mark.parametrize(
    ("nodes", "accept", "indices"),
    [
        ([[0, 2, 3], [1, -1, -1], [0, 1, 2], [-1, -1, -1], [3, 0, 1]], [3, 1, 2, 3, 9], None),
        ([[0, 2, -1], [1, 3, 0]], [3, 2], [4, 2]),
        ([[4, 1, 0], [0, 5, 6], [2, -3, INT32_MIN]], [1, 3, INT32_MAX], None),  # node >= V: skipped
        ([[0, 1, 2], [2, 1, 0], [1, 1, 1]], [0, -1, INT32_MIN], [0, 1, 2]),  # nothing accepted
        ([[1, INT32_MAX, 2], [INT32_MAX, INT32_MIN, 0]], [2, 3], [1, -7]),
    ],
)
def test_tree_commit_follows_the_rule(backend, rng, nodes, accept, indices):
    cache = make(backend)
    fill_random([cache], rng)
    nodes = np.array(nodes, dtype=np.int32)
    before = snapshot(cache)
    cache.scatter_accepted_tree_states(
        device_int32(backend, nodes),
        device_int32(backend, accept),
        None if indices is None else device_int32(backend, indices),
    )
    assert_same_bits(snapshot(cache), expected_tree(before, nodes, accept, indices, 4), f"tree {nodes.tolist()}")


def test_tree_commit_after_reshape(backend, rng):
    cache = make(backend)
    fill_random([cache], rng)
    cache.reshape_intermediate_states(3, 3)
    before = snapshot(cache)
    nodes = np.array([[0, 2], [1, 0], [2, 2]], dtype=np.int32)
    cache.scatter_accepted_tree_states(device_int32(backend, nodes), device_int32(backend, [2, 1, 2]))
    assert_same_bits(snapshot(cache), expected_tree(before, nodes, [2, 1, 2], None, 3), "tree after reshape")


@pytest.mark.parametrize(
    ("nodes", "accept", "exc", "msg"),
    [
        (np.zeros((2, 2), np.int64), [1, 1], TypeError, "accepted_node_ids must have dtype int32, got int64"),
        (np.zeros(2, np.int32), [1, 1], ValueError, r"accepted_node_ids must be 2-D \[active, max_accept_len\]"),
        (
            np.zeros((3, 2), np.int32),
            [1, 1],
            ValueError,
            r"accepted_node_ids must have len\(accept_lengths\) = 2 rows, got 3",
        ),
        (np.zeros((2, 4), np.int32)[:, ::2], [1, 1], ValueError, "accepted_node_ids must be contiguous"),
    ],
)
def test_tree_bad_inputs_change_nothing(backend, rng, nodes, accept, exc, msg):
    cache = make(backend)
    fill_random([cache], rng)
    before = snapshot(cache)
    if backend == "numba" and nodes.flags.c_contiguous:
        from numba import cuda

        nodes = cuda.to_device(nodes)  # the same mistakes, made on the device (dtype kept)
    with pytest.raises(exc, match=msg):
        cache.scatter_accepted_tree_states(nodes, device_int32(backend, accept))
    assert_same_bits(snapshot(cache), before, msg)
