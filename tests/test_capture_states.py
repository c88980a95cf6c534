"""capture_states(slot, out=(recurrent_out, conv_out)): both kinds, every layer, into caller memory.

Checked on both backends against the pools themselves: the outputs hold the slot's bits, the
memory around the outputs and every pool stay bit-identical, and a bad output is refused before
either output is written. The GPU tests show it is one prepared launch, replayable from a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    NumbaMambaCacheManager,
    assert_same_bits,
    fill_random,
    needs_gpu,
    random_bits,
    small_config,
    snapshot,
    to_host,
)

GUARD = 37  # elements of guard memory before and after each output


def out_shapes(cache) -> list[tuple]:
    return [(p.shape[0], 1, *p.shape[2:]) for p in (cache.pools.recurrent, cache.pools.conv)]


def guarded_outputs(backend, cache, rng):
    """Each output as a view into a larger buffer of random bits (the guards must survive)."""
    buffers, outs = [], []
    for shape, pool in zip(out_shapes(cache), (cache.pools.recurrent, cache.pools.conv), strict=True):
        size = int(np.prod(shape))
        host = random_bits(rng, size + 2 * GUARD, pool.dtype)
        if backend == "numpy":
            buffer = host
        else:
            from numba import cuda

            buffer = cuda.to_device(host)
        buffers.append(buffer)
        outs.append(buffer[GUARD : GUARD + size].reshape(shape))
    return buffers, tuple(outs)


def host_bits(array) -> bytes:
    return to_host(array).tobytes()


@pytest.mark.parametrize(
    "dtypes",
    [("float32", "float16"), ("bfloat16", "bfloat16"), ("float64", "float32"), ("float16", "bfloat16")],
    ids=lambda d: "-".join(d),
)
@pytest.mark.parametrize("layers", [1, 3])
def test_capture_states_copies_both_kinds_of_one_slot(backend, rng, dtypes, layers):
    # conv_dim 7 x kernel 3 of 2-byte states is 42 bytes a slot: words narrower than 8 bytes too
    config = small_config(num_recurrent_layers=layers, recurrent_state_dtype=dtypes[0], conv_state_dtype=dtypes[1])
    cache = BACKENDS[backend](config)
    fill_random([cache], rng)
    buffers, out = guarded_outputs(backend, cache, rng)
    guards_before = [to_host(b) for b in buffers]
    before = snapshot(cache)
    for slot in (4, 0, 2, 4):
        got = cache.capture_states(slot, out=out)
        assert got is out
        for i, kind in enumerate(("recurrent", "conv")):
            assert host_bits(out[i]) == before[kind][:, slot : slot + 1].tobytes(), (slot, kind)
        for buffer, guard in zip(buffers, guards_before, strict=True):
            host = to_host(buffer)
            assert host[:GUARD].tobytes() == guard[:GUARD].tobytes(), "memory before an output was written"
            assert host[-GUARD:].tobytes() == guard[-GUARD:].tobytes(), "memory after an output was written"
    assert_same_bits(snapshot(cache), before, "capture_states must not change the pools")


def test_capture_states_agrees_with_the_per_kind_captures(backend, rng):
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    _, out = guarded_outputs(backend, cache, rng)
    cache.capture_states(3, out=out)
    rec = np.stack([to_host(a) for a in cache.capture_recurrent_states(3)])
    conv = np.stack([to_host(a) for a in cache.capture_conv_states(3)])
    assert host_bits(out[0]) == rec.tobytes() and host_bits(out[1]) == conv.tobytes()


def bad_outputs(backend):
    """(id, make(shapes, dtypes) -> out, error, message) for outputs that must be refused."""

    def device(array):
        if backend == "numpy" or not isinstance(array, np.ndarray):
            return array
        from numba import cuda

        return cuda.to_device(array)

    def pair(first, second):
        return lambda shapes, dtypes: (device(first(shapes[0], dtypes[0])), device(second(shapes[1], dtypes[1])))

    good = np.zeros
    return [
        ("not a pair", lambda shapes, dtypes: device(np.zeros(shapes[0], dtypes[0])), TypeError, "out must be a pair"),
        (
            "three",
            lambda shapes, dtypes: tuple(device(np.zeros(s, d)) for s, d in zip(shapes, dtypes, strict=True)) * 2,
            TypeError,
            "of length 4",
        ),
        (
            "shape 0",
            pair(lambda s, d: np.zeros(s[1:], d), good),
            ValueError,
            r"out\[0\] must have shape \[3, 1, 2, 3, 5\]",
        ),
        ("shape 1", pair(good, lambda s, d: np.zeros((s[0], 2, *s[2:]), d)), ValueError, r"out\[1\] must have shape"),
        ("dtype 1", pair(good, lambda s, d: np.zeros(s, np.float32)), TypeError, r"out\[1\] must have dtype float16"),
        (
            "strided 1",
            pair(good, lambda s, d: device(np.zeros((s[0], 2, *s[2:]), d))[:, :1]),
            ValueError,
            r"out\[1\] must be contiguous",
        ),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in bad_outputs("numpy")])
def test_a_bad_output_is_refused_before_anything_is_written(backend, rng, case):
    _, make, error, message = bad_outputs(backend)[case]
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    pools = (cache.pools.recurrent, cache.pools.conv)
    out = make(out_shapes(cache), [p.dtype for p in pools])
    outs_before = [host_bits(o) for o in out] if isinstance(out, tuple) else None
    before = snapshot(cache)
    with pytest.raises(error, match=message):
        cache.capture_states(1, out=out)
    assert_same_bits(snapshot(cache), before, "refused capture")
    if outs_before is not None:
        assert [host_bits(o) for o in out] == outs_before, "a refused capture wrote an output"


def test_capture_states_refuses_bad_slots_and_closed_managers(backend, rng):
    cache = BACKENDS[backend](small_config())
    _, out = guarded_outputs(backend, cache, rng)
    with pytest.raises(IndexError, match=r"batch_idx must be in \[0, 5\), got 5"):
        cache.capture_states(5, out=out)
    with pytest.raises(TypeError, match="batch_idx must be an integer"):
        cache.capture_states(1.0, out=out)
    empty = BACKENDS[backend](small_config(num_recurrent_layers=0))
    with pytest.raises(IndexError, match="no recurrent layers"):
        empty.capture_states(0, out=out)
    cache.close()
    with pytest.raises(ValueError, match="capture_states: this manager was closed"):
        cache.capture_states(0, out=out)


def test_numba_capture_states_refuses_host_outputs(rng):
    cache = NumbaMambaCacheManager(small_config())
    shapes = out_shapes(cache)
    with pytest.raises(TypeError, match=r"out\[0\] must be a device array"):
        cache.capture_states(0, out=(np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.float16)))


def test_a_new_output_pair_is_checked_and_used(backend, rng):
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    _, first = guarded_outputs(backend, cache, rng)
    _, second = guarded_outputs(backend, cache, rng)
    cache.capture_states(1, out=first)
    cache.capture_states(2, out=second)  # re-points the launch at the new pair
    cache.capture_states(3, out=first)  # and back
    pools = snapshot(cache)
    assert host_bits(second[0]) == pools["recurrent"][:, 2:3].tobytes()
    assert host_bits(first[1]) == pools["conv"][:, 3:4].tobytes()


@needs_gpu
def test_capture_states_is_one_prepared_launch_replayable_from_a_cuda_graph(rng):
    from cuda.bindings import driver
    from numba import cuda

    from mamba_cache.core.launch import PreparedLaunch

    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="bfloat16"))
    shapes = out_shapes(cache)
    out = (cuda.device_array(shapes[0], np.uint16), cuda.device_array(shapes[1], np.float16))
    stream = cuda.stream()
    cache.capture_states(0, stream, out=out)  # prepares the launch outside the capture
    stream.synchronize()
    outs, (launch, _grid), _bound = cache._launches["capture_pair"]  # the pair seen last and its launch
    assert outs is not None and isinstance(launch, PreparedLaunch)
    handle = int(stream.handle)
    assert driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)[0] == 0
    cache.capture_states(3, stream, out=out)
    err, graph = driver.cuStreamEndCapture(handle)
    assert err == 0
    err, _, count = driver.cuGraphGetNodes(graph, 0)
    assert err == 0 and count == 1, "both kinds of every layer in ONE kernel launch"
    err, exec_graph = driver.cuGraphInstantiate(graph, 0)
    assert err == 0
    for _ in range(2):
        fill_random([cache], rng)
        assert driver.cuGraphLaunch(exec_graph, handle)[0] == 0
        stream.synchronize()
        assert to_host(out[0]).tobytes() == to_host(cache.pools.recurrent)[:, 3:4].tobytes()
        assert to_host(out[1]).tobytes() == to_host(cache.pools.conv)[:, 3:4].tobytes()


@needs_gpu
def test_capture_states_into_torch_outputs_including_bfloat16(rng):
    torch = pytest.importorskip("torch")
    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="bfloat16"))
    fill_random([cache], rng)
    shapes = out_shapes(cache)
    out = (
        torch.empty(shapes[0], dtype=torch.bfloat16, device="cuda"),  # through DLPack: CAI has no bfloat16
        torch.empty(shapes[1], dtype=torch.float16, device="cuda"),
    )
    cache.capture_states(2, torch.cuda.current_stream(), out=out)
    torch.cuda.synchronize()
    assert out[0].view(torch.uint16).cpu().numpy().tobytes() == to_host(cache.pools.recurrent)[:, 2:3].tobytes()
    assert out[1].cpu().numpy().tobytes() == to_host(cache.pools.conv)[:, 2:3].tobytes()


def test_the_capture_kernel_compiles_to_wide_loads_without_local_memory():
    """copy_rows (what capture_states launches) as PTX for sm_90: 8-byte words, 4 per thread, no local memory."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        from numba import cuda, types
        from mamba_cache.core import kernels
        w3 = types.uint64[:, :, ::1]
        i1 = types.int32[::1]
        sig = (w3, w3, w3, w3, types.int64, i1, i1, types.int64, types.int64, types.int64)
        ptx, _ = cuda.compile_ptx(kernels.copy_rows.py_func, sig, cc=(9, 0))
        body = ptx[ptx.index(".entry"):]
        assert ".local" not in body, "copy_rows uses local memory"
        assert body.count("ld.global.u64") == 2 * kernels.WORDS_PER_THREAD, body.count("ld.global.u64")
        assert body.count("st.global.u64") == 2 * kernels.WORDS_PER_THREAD, body.count("st.global.u64")
        print("ok")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_an_output_that_starts_off_an_8_byte_boundary_is_copied_in_narrower_words(rng, offset):
    """A caller's output may start at any element of a larger buffer. The copy kernels move 8-byte
    words, and an 8-byte access to memory aligned to fewer bytes faults on the GPU (misaligned
    address), so the word must be as narrow as the output's start requires (and no narrower)."""
    from numba import cuda

    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="float16", conv_state_dtype="float16"))
    fill_random([cache], rng)
    outs = []
    for shape in out_shapes(cache):
        size = int(np.prod(shape))
        buffer = cuda.to_device(np.zeros(size + 8, dtype=np.float16))  # the allocation itself is aligned
        outs.append(buffer[offset : offset + size].reshape(shape))
    cache.capture_states(2, out=tuple(outs))
    cache.capture_recurrent_states(1, out=outs[0])
    word = {0: 8, 1: 2, 2: 4, 3: 2}[offset]  # float16 elements: 2 bytes each
    assert ("capture_pair", word, word) in cache._launches
    assert any(key[:1] == ("capture",) and key[-1] == word for key in cache._launches if isinstance(key, tuple))
    assert host_bits(outs[0]) == host_bits(cache.pools.recurrent[:, 1:2])
    assert host_bits(outs[1]) == host_bits(cache.pools.conv[:, 2:3])
