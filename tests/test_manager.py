"""Each method's documented behaviour and edge cases, and each bad input's error, on both backends."""

import copy
import logging
import pickle

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    assert_same_bits,
    device_int32,
    fill_random,
    small_config,
    snapshot,
    to_host,
)

from mamba_cache import Config


def make(backend, config=None):
    return BACKENDS[backend](config)


# ---------------------------------------------------------------- construction and layouts
def test_layouts_dtypes_and_zero_init(backend):
    config = small_config()
    cache = make(backend, config)
    assert cache.num_layers() == 3 and cache.get_config() is config
    for layer in range(3):
        rec, conv = cache.get_recurrent_state(layer), cache.get_conv_state(layer)
        irec, iconv = cache.get_intermediate_recurrent_state(layer), cache.get_intermediate_conv_state(layer)
        assert rec.shape == (5, 2, 3, 5) and rec.dtype == np.float32
        assert conv.shape == (5, 7, 3) and conv.dtype == np.float16
        assert irec.shape == (5, 4, 2, 3, 5) and irec.dtype == np.float32
        assert iconv.shape == (5, 4, 7, 3) and iconv.dtype == np.float16
        for view in (rec, conv, irec, iconv):
            host = to_host(view)
            assert host.flags.c_contiguous and not host.any()
    assert cache.has_intermediate_recurrent_states() and cache.has_intermediate_conv_states()


def test_layer_views_write_through(backend, rng):
    cache = make(backend, small_config())
    values = rng.standard_normal((5, 2, 3, 5)).astype(np.float32)
    view = cache.get_recurrent_state(1)
    if backend == "numpy":
        view[...] = values
    else:
        view.copy_to_device(values)
    assert np.array_equal(to_host(cache.pools.recurrent[1]), values)
    assert not to_host(cache.pools.recurrent[0]).any()


@pytest.mark.parametrize("config", [None, Config(), Config(num_recurrent_layers=0, max_batch_size=8)])
def test_empty_manager_is_a_no_op(backend, config):
    cache = make(backend, config)
    assert cache.num_layers() == 0
    assert cache.capture_recurrent_states(0) == [] and cache.capture_conv_states(5) == []
    cache.clear_states()
    cache.reshape_intermediate_states(1, 1)
    cache.scatter_mtp_states(device_int32(backend, [1]))
    assert not cache.has_intermediate_recurrent_states() and not cache.has_intermediate_conv_states()
    with pytest.raises(IndexError, match="no recurrent layers"):
        cache.get_recurrent_state(0)
    with pytest.raises(IndexError, match="no recurrent layers"):
        cache.get_intermediate_conv_state(0)


def test_no_mtp_buffers_when_seq_len_zero(backend):
    cache = make(backend, small_config(max_intermediate_seq_len=0))
    assert not cache.has_intermediate_recurrent_states() and not cache.has_intermediate_conv_states()
    for getter in (cache.get_intermediate_recurrent_state, cache.get_intermediate_conv_state):
        with pytest.raises(RuntimeError, match="not allocated"):
            getter(0)
    cache.reshape_intermediate_states(99, 99)  # no-op, as in the C++
    cache.scatter_mtp_states(device_int32(backend, [1, 2]))  # no-op
    assert cache.intermediate_shape == (0, 0)


def test_allocation_is_logged(backend, caplog):
    with caplog.at_level(logging.INFO, logger="mamba_cache"):
        make(backend, small_config())
    (record,) = [r for r in caplog.records if r.name == "mamba_cache"]
    assert str(small_config().total_bytes) in record.getMessage()


def test_config_type_checked(backend):
    with pytest.raises(TypeError, match="config must be a mamba_cache.Config"):
        make(backend, {"num_recurrent_layers": 1})


@pytest.mark.parametrize(
    "getter",
    ["get_recurrent_state", "get_conv_state", "get_intermediate_recurrent_state", "get_intermediate_conv_state"],
)
@pytest.mark.parametrize("bad", [3, -1, 2**40])
def test_layer_index_out_of_range(backend, getter, bad):
    cache = make(backend, small_config())
    with pytest.raises(IndexError, match=rf"recurrent_layer_idx must be in \[0, 3\), got {bad}"):
        getattr(cache, getter)(bad)


@pytest.mark.parametrize("bad", [1.0, "0", None, True])
def test_layer_index_type(backend, bad):
    with pytest.raises(TypeError, match="recurrent_layer_idx must be an integer"):
        make(backend, small_config()).get_conv_state(bad)


# ---------------------------------------------------------------- clear
def test_clear_zeroes_main_pools_only(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.clear_states()
    after = snapshot(cache)
    assert not after["recurrent"].any() and not after["conv"].any()
    assert_same_bits(
        {k: before[k] for k in ("intermediate_recurrent", "intermediate_conv")},
        {k: after[k] for k in ("intermediate_recurrent", "intermediate_conv")},
        "clear",
    )


# ---------------------------------------------------------------- capture
@pytest.mark.parametrize("kind", ["recurrent", "conv"])
def test_capture_copies_one_slot_of_every_layer(backend, rng, kind):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    pool = snapshot(cache)[kind]
    captured = getattr(cache, f"capture_{kind}_states")(3)
    assert len(captured) == 3
    for layer, array in enumerate(captured):
        host = to_host(array)
        assert host.shape == (1, *pool.shape[2:]) and host.dtype == pool.dtype
        assert host.tobytes() == pool[layer, 3:4].tobytes()
    cache.clear_states()  # a capture is a copy: later pool changes do not reach it
    assert to_host(captured[2]).tobytes() == pool[2, 3:4].tobytes()


@pytest.mark.parametrize("bad", [5, -1])
def test_capture_slot_out_of_range(backend, bad):
    cache = make(backend, small_config())
    for capture in (cache.capture_recurrent_states, cache.capture_conv_states):
        with pytest.raises(IndexError, match=rf"batch_idx must be in \[0, 5\), got {bad}"):
            capture(bad)


# ---------------------------------------------------------------- reshape
def test_reshape_reinterprets_the_start_of_the_buffer(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    flat = snapshot(cache)["intermediate_recurrent"]
    cache.reshape_intermediate_states(3, 2)
    assert cache.intermediate_shape == (3, 2)
    view = to_host(cache.get_intermediate_recurrent_state(1))
    assert view.shape == (3, 2, 2, 3, 5)
    assert view.tobytes() == flat[1, : 3 * 2 * 30].tobytes()
    # [b, t] of the reshaped view is not [b, t] of the full-size view when seq != S
    full = flat[1].reshape(5, 4, 2, 3, 5)
    assert view[1, 0].tobytes() == full[0, 2].tobytes()
    conv = to_host(cache.get_intermediate_conv_state(2))
    assert conv.shape == (3, 2, 7, 3)
    cache.reshape_intermediate_states(5, 4)  # back to full size
    assert to_host(cache.get_intermediate_recurrent_state(1)).tobytes() == flat[1].tobytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 2), r"active_batch_size must be in \[1, 5\], got 0"),
        ((6, 2), r"active_batch_size must be in \[1, 5\], got 6"),
        ((2, 0), r"seq_len must be in \[1, 4\], got 0"),
        ((2, 5), r"seq_len must be in \[1, 4\], got 5"),
    ],
)
def test_reshape_out_of_range_changes_nothing(backend, args, message):
    cache = make(backend, small_config())
    cache.reshape_intermediate_states(2, 3)
    with pytest.raises(ValueError, match=message):
        cache.reshape_intermediate_states(*args)
    assert cache.intermediate_shape == (2, 3)
    assert cache.get_intermediate_conv_state(0).shape == (2, 3, 7, 3)


def test_reshape_types_checked(backend):
    with pytest.raises(TypeError, match="seq_len must be an integer"):
        make(backend, small_config()).reshape_intermediate_states(1, 2.0)


# ---------------------------------------------------------------- scatter
def expected_after_scatter(before, accept, seq_len):
    """The documented rule, written independently of the NumPy backend: one row at a time."""
    expected = {k: v.copy() for k, v in before.items()}
    for kind in ("recurrent", "conv"):
        pool, inter = expected[kind], before[f"intermediate_{kind}"]
        layers, slots = pool.shape[:2]
        elems = pool[0, 0].size
        for b, a in enumerate(accept):
            step = int(a) - 1
            if 0 <= step < seq_len - 1:
                for layer in range(layers):
                    start = (b * seq_len + step) * elems
                    pool[layer, b] = inter[layer, start : start + elems].reshape(pool.shape[2:])
    return expected


@pytest.mark.parametrize(
    ("active", "seq_len", "accept"),
    [
        (5, 4, [1, 2, 3, 4, 0]),  # partial accepts, a full accept, padding
        (3, 2, [2, 1, -7]),  # V = 2: only step 0 is ever copied
        (4, 3, [2**31 - 1, -(2**31), 3, 2]),  # extreme values are skipped
        (2, 1, [1, 1]),  # V = 1: nothing is ever copied
        (5, 4, [3, 3, 3, 3, 3]),
    ],
)
def test_scatter_follows_the_rule(backend, rng, active, seq_len, accept):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    cache.reshape_intermediate_states(active, seq_len)
    before = snapshot(cache)
    cache.scatter_mtp_states(device_int32(backend, accept))
    assert_same_bits(snapshot(cache), expected_after_scatter(before, accept, seq_len), "scatter")


def test_scatter_never_touches_rows_past_accept_lengths(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.scatter_mtp_states(device_int32(backend, [2, 3]))
    after = snapshot(cache)
    for kind in ("recurrent", "conv"):
        assert after[kind][:, 2:].tobytes() == before[kind][:, 2:].tobytes()
        assert after[kind][:, :2].tobytes() != before[kind][:, :2].tobytes()


def test_scatter_empty_accept_lengths_is_a_no_op(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.scatter_mtp_states(device_int32(backend, []))
    assert_same_bits(snapshot(cache), before, "empty scatter")


def test_scatter_accepts_a_host_array_on_both_backends(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    cache.scatter_mtp_states(np.array([2, 0, 3], dtype=np.int32))
    assert_same_bits(snapshot(cache), expected_after_scatter(before, [2, 0, 3], 4), "host accept_lengths")


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.array([1, 2], dtype=np.int64), TypeError, "accept_lengths must have dtype int32, got int64"),
        (np.array([1.0, 2.0], dtype=np.float32), TypeError, "accept_lengths must have dtype int32, got float32"),
        (np.ones((2, 2), dtype=np.int32), ValueError, r"accept_lengths must be 1-D \[active\], got shape \(2, 2\)"),
        (
            np.ones(6, dtype=np.int32),
            ValueError,
            r"accept_lengths must have length in \[0, 5\] \(the active batch of the latest reshape",
        ),
        (np.ones(8, dtype=np.int32)[::2], ValueError, "accept_lengths must be contiguous"),
        ([1, 2], TypeError, "accept_lengths must be a"),
    ],
)
def test_scatter_bad_accept_lengths_change_nothing(backend, rng, bad, error, message):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    if backend == "numba" and isinstance(bad, np.ndarray) and bad.flags.c_contiguous:
        from numba import cuda

        bad = cuda.to_device(bad)  # the same mistakes, made on the device
    with pytest.raises(error, match=message):
        cache.scatter_mtp_states(bad)
    assert_same_bits(snapshot(cache), before, "rejected scatter")


def test_numpy_backend_refuses_device_arrays():
    class FakeDeviceArray:
        __cuda_array_interface__ = {"shape": (1,), "typestr": "<i4", "data": (0, False), "version": 3}

    cache = make("numpy", small_config())
    with pytest.raises(TypeError, match="host numpy.ndarray for the NumPy backend, got a device array"):
        cache.scatter_mtp_states(FakeDeviceArray())


# ---------------------------------------------------------------- ownership
def test_copy_and_pickle_refused(backend):
    cache = make(backend, small_config())
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be"):
            attempt(cache)


def test_move_transfers_the_buffers(backend, rng):
    cache = make(backend, small_config())
    fill_random([cache], rng)
    before = snapshot(cache)
    view = cache.get_conv_state(1)
    moved = cache.move()
    assert moved.num_layers() == 3 and type(moved) is type(cache)
    assert_same_bits(snapshot(moved), before, "moved")
    assert to_host(view).tobytes() == before["conv"][1].tobytes()  # views handed out stay valid
    assert cache.num_layers() == 0 and cache.get_config() == Config()
    assert not cache.has_intermediate_conv_states()
    for call in (cache.clear_states, lambda: cache.capture_conv_states(0), lambda: cache.get_recurrent_state(0)):
        with pytest.raises(ValueError, match="closed or moved from"):
            call()
    assert "closed" in repr(cache) and "layers=3" in repr(moved)


def test_close_and_context_manager(backend):
    with make(backend, small_config()) as cache:
        assert cache.num_layers() == 3
    assert cache.num_layers() == 0
    with pytest.raises(ValueError, match="closed or moved from"):
        cache.get_intermediate_recurrent_state(0)
    cache.close()  # idempotent


def test_pools_is_a_read_only_view_of_the_live_pools(backend, rng):
    manager = BACKENDS[backend](small_config())
    pools = manager.pools
    assert [name for name in pools._fields if getattr(pools, name) is not None] == list(pools._fields)
    fill_random([manager], rng)
    for layer in range(manager.num_layers()):  # the same memory the layer views show
        assert (
            to_host(manager.pools.recurrent)[layer].tobytes() == to_host(manager.get_recurrent_state(layer)).tobytes()
        )
        assert to_host(manager.pools.conv)[layer].tobytes() == to_host(manager.get_conv_state(layer)).tobytes()
    manager.clear_slot(2)  # the view follows the pools
    assert not to_host(manager.pools.recurrent)[:, 2].any() and to_host(manager.pools.recurrent)[:, 1].any()
    if backend == "numpy":
        with pytest.raises(ValueError, match="read-only"):
            manager.pools.recurrent[0, 0] = 1
    moved = manager.move()
    assert manager.pools is None and moved.pools is not None
    assert to_host(moved.pools.conv)[0].tobytes() == to_host(moved.get_conv_state(0)).tobytes()
    moved.close()
    assert moved.pools is None
    assert BACKENDS[backend](small_config(num_recurrent_layers=0)).pools is None
