"""Streams: managers on different streams do not interfere; work is ordered after prior work on its stream."""

import numpy as np
import pytest
from helpers import ON_GPU, assert_same_bits, fill_random, small_config, snapshot
from numba import cuda

from mamba_cache import NumbaMambaCacheManager, NumpyMambaCacheManager


def test_two_managers_on_two_streams(rng):
    config = small_config()
    streams = [cuda.stream(), cuda.stream()]
    pairs = []
    for stream in streams:
        ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config, stream=stream)
        fill_random([ref, dev], rng)
        pairs.append((ref, dev, stream))
    for round_ in range(4):  # interleave work on both streams, no synchronisation in between
        for ref, dev, stream in pairs:
            accept = rng.integers(-1, 6, size=5).astype(np.int32)
            ref.scatter_mtp_states(accept)
            dev.scatter_mtp_states(cuda.to_device(accept, stream=stream), stream=stream)
            if round_ == 2:
                ref.clear_states()
                dev.clear_states(stream=stream)
    for ref, dev, stream in pairs:
        stream.synchronize()
        assert_same_bits(snapshot(ref), snapshot(dev), "stream pair")


@cuda.jit
def slow_fill(flat, value, spins):
    """Wait about ``spins`` microseconds, then fill ``flat`` with ``value``."""
    i = cuda.grid(1)
    for _ in range(spins):
        cuda.nanosleep(1000)
    if i < flat.shape[0]:
        flat[i] = value


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: the simulator runs every launch synchronously")
@pytest.mark.filterwarnings("ignore:.*Grid size")  # the slow fill is small on purpose
def test_scatter_waits_for_earlier_work_on_its_stream():
    config = small_config()
    stream = cuda.stream()
    cache = NumbaMambaCacheManager(config, stream=stream)
    accept = cuda.to_device(np.array([1, 2, 3, 0, 4], dtype=np.int32), stream=stream)
    for layer in range(config.num_recurrent_layers):
        flat = cache.pools.intermediate_recurrent[layer]
        slow_fill[(flat.shape[0] + 127) // 128, 128, stream](flat, np.float32(layer + 7), 2000)  # ~2 ms
    cache.scatter_mtp_states(accept, stream=stream)
    captured = cache.capture_recurrent_states(2, stream=stream)
    stream.synchronize()
    for layer in range(config.num_recurrent_layers):
        state = cache.get_recurrent_state(layer).copy_to_host()
        assert (state[:3] == layer + 7).all(), "the scatter ran before the fill it was queued after"
        assert not state[3:].any()
        assert (captured[layer].copy_to_host() == layer + 7).all()


def test_default_stream_is_the_stream_of_a_call_without_one(rng):
    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config, stream=cuda.stream())
    assert ref.default_stream is None  # the NumPy backend has no streams
    stream = dev.default_stream
    assert stream is not None and dev.default_stream is stream  # resolved once
    assert dev._stream(stream) == dev._stream(None)  # passing it on is the same as passing nothing
    with pytest.raises(AttributeError):
        dev.default_stream = cuda.stream()  # read-only
    fill_random([ref, dev], rng)
    ref.clear_states()
    dev.clear_states(stream=stream)
    stream.synchronize()
    assert_same_bits(snapshot(ref), snapshot(dev), "a call on default_stream")
