"""Adversarial inputs for every kernel, checked against the reference; also run under compute-sanitizer.

``.ci/sanitize`` runs this file (and the parity tests) under ``compute-sanitizer --tool memcheck``
on the GPU machine: no int32 accept length, no active batch from 1 to max, no verify length may
make a kernel read or write out of bounds. (The kernels use no shared memory, so racecheck has
nothing to check.)
"""

import itertools

import numpy as np
import pytest
from helpers import assert_same_bits, fill_random, snapshot, to_host

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CONFIG = Config(
    num_recurrent_layers=3,
    max_batch_size=5,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=3,
    recurrent_state_size=5,
    conv_dim=7,
    conv_kernel=3,
    max_intermediate_seq_len=4,
    recurrent_state_dtype="float32",
)
B, S = CONFIG.max_batch_size, CONFIG.max_intermediate_seq_len


def special_values(seq_len):
    return [INT32_MIN, -1, 0, seq_len - 1, seq_len, INT32_MAX, 1]


@pytest.mark.parametrize(("active", "seq_len"), list(itertools.product([1, B], [1, 2, S])))
def test_scatter_with_every_special_accept_length(rng, active, seq_len):
    from numba import cuda

    ref, dev = NumpyMambaCacheManager(CONFIG), NumbaMambaCacheManager(CONFIG)
    fill_random([ref, dev], rng)
    ref.reshape_intermediate_states(active, seq_len)
    dev.reshape_intermediate_states(active, seq_len)
    values = special_values(seq_len)
    for start in range(len(values)):  # every value lands in the first and the last row
        accept = np.array([values[(start + i) % len(values)] for i in range(active)], dtype=np.int32)
        ref.scatter_mtp_states(accept)
        dev.scatter_mtp_states(cuda.to_device(accept))
        assert_same_bits(snapshot(ref), snapshot(dev), f"accept {accept.tolist()}")
    # accept_lengths longer than the reshaped batch names rows this verify pass never wrote: refused
    if active < B:
        before = snapshot(ref)
        accept = np.array([INT32_MAX, seq_len - 1, 1, INT32_MIN, seq_len][: active + 1], dtype=np.int32)
        for manager, arg in ((ref, accept), (dev, cuda.to_device(accept))):
            with pytest.raises(ValueError, match=rf"accept_lengths must have length in \[0, {active}\]"):
                manager.scatter_mtp_states(arg)
        assert_same_bits(before, snapshot(ref), "refused scatter (reference)")
        assert_same_bits(before, snapshot(dev), "refused scatter (numba)")


@pytest.mark.parametrize("slot", [0, B - 1])
def test_capture_first_and_last_slot(rng, slot):
    ref, dev = NumpyMambaCacheManager(CONFIG), NumbaMambaCacheManager(CONFIG)
    fill_random([ref, dev], rng)
    for kind in ("recurrent", "conv"):
        want = getattr(ref, f"capture_{kind}_states")(slot)
        got = getattr(dev, f"capture_{kind}_states")(slot)
        assert [w.tobytes() for w in want] == [to_host(g).tobytes() for g in got]


def test_clear_and_construction_zero_exactly_the_pools(rng):
    dev = NumbaMambaCacheManager(CONFIG)
    assert not any(to_host(p).any() for p in dev.pools)
    fill_random([dev], rng)
    before = snapshot(dev)
    dev.clear_states()
    after = snapshot(dev)
    assert not after["recurrent"].any() and not after["conv"].any()
    assert after["intermediate_recurrent"].tobytes() == before["intermediate_recurrent"].tobytes()
