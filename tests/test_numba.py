"""Numba-backend specifics: streams, foreign device arrays, zero-copy, CUDA graphs, generated code.

Tests that need a real GPU say so in their skip reason; everything else runs under the simulator.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import ON_GPU, assert_same_bits, fill_random, needs_gpu, small_config, snapshot, to_host
from numba import cuda

from mamba_cache import ConfigError, NumbaMambaCacheManager, NumpyMambaCacheManager
from mamba_cache.core.kernels import MAX_THREADS, WORDS_PER_THREAD, launch_shape


@pytest.mark.parametrize(
    ("words", "shape"),
    [
        (1, (1, 32)),
        (128, (1, 32)),
        (129, (1, 64)),
        (1024, (1, 256)),
        (1025, (2, 256)),
        (4096, (4, 256)),
    ],
)
def test_launch_shape_covers_the_slot(words, shape):
    (chunks,), threads = launch_shape(words)
    assert (chunks, threads) == shape
    assert chunks * threads * WORDS_PER_THREAD >= words > (chunks - 1) * threads * WORDS_PER_THREAD
    assert threads % 32 == 0 and threads <= MAX_THREADS


def test_launch_shape_of_two_kinds_sizes_threads_for_the_larger():
    assert launch_shape(1025, 3) == ((2, 1), 256)
    assert launch_shape(3, 129) == ((1, 1), 64)


def test_grid_limits_checked():
    with pytest.raises(ConfigError, match="max_batch_size must be <= 65535 for the Numba backend"):
        NumbaMambaCacheManager(small_config(max_batch_size=65536))


def test_numba_stream_is_used():
    stream = cuda.stream()
    cache = NumbaMambaCacheManager(small_config(), stream=stream)
    cache.clear_states(stream=stream)
    cache.scatter_mtp_states(cuda.to_device(np.array([1, 2], np.int32), stream=stream), stream=stream)
    captured = cache.capture_recurrent_states(1, stream=stream)
    stream.synchronize()
    assert not to_host(captured[0]).any()


@pytest.mark.parametrize("bad", ["default", 1.5, object()])
def test_bad_stream_type(bad):
    if not ON_GPU:
        pytest.skip("the simulator accepts any stream object")
    cache = NumbaMambaCacheManager(small_config())
    with pytest.raises(TypeError, match="stream must be None, a numba.cuda stream"):
        cache.clear_states(stream=bad)


@needs_gpu
def test_raw_handles_and_stream_protocol():
    stream = cuda.stream()

    class ProtocolStream:
        def __cuda_stream__(self):
            return (0, int(stream.handle))

    cache = NumbaMambaCacheManager(small_config())
    for handle in (0, int(stream.handle), ProtocolStream()):
        cache.clear_states(stream=handle)
    stream.synchronize()


@needs_gpu
def test_foreign_cuda_array_interface_accept_lengths(rng):
    """Any object exposing __cuda_array_interface__ (as torch and CuPy tensors do) is accepted."""
    device = cuda.to_device(np.array([2, 0, 4, 1], dtype=np.int32))

    class Foreign:
        __cuda_array_interface__ = device.__cuda_array_interface__

    ref, dev = NumpyMambaCacheManager(small_config()), NumbaMambaCacheManager(small_config())
    fill_random([ref, dev], rng)
    ref.scatter_mtp_states(device.copy_to_host())
    dev.scatter_mtp_states(Foreign())
    assert_same_bits(snapshot(ref), snapshot(dev), "foreign accept_lengths")


@needs_gpu
def test_zero_copy_with_torch(rng):
    torch = pytest.importorskip("torch")
    cache = NumbaMambaCacheManager(small_config())
    state = cache.get_recurrent_state(1)
    view = torch.as_tensor(state, device="cuda")
    assert view.shape == (5, 2, 3, 5) and view.dtype == torch.float32
    assert view.data_ptr() == state.__cuda_array_interface__["data"][0]  # shared, not copied
    view.fill_(3.0)
    torch.cuda.synchronize()
    assert (to_host(cache.get_recurrent_state(1)) == 3.0).all()
    assert not to_host(cache.get_recurrent_state(0)).any()
    ref = NumpyMambaCacheManager(small_config())
    ref.get_recurrent_state(1)[...] = 3.0
    fill = [ref, cache]
    fill_random(fill, rng)
    acc = torch.tensor([3, 1, 0, 2], dtype=torch.int32, device="cuda")
    cache.scatter_mtp_states(acc)
    ref.scatter_mtp_states(acc.cpu().numpy())
    assert_same_bits(snapshot(ref), snapshot(cache), "torch accept_lengths")


@needs_gpu
def test_zero_copy_with_cupy():
    cupy = pytest.importorskip("cupy")
    cache = NumbaMambaCacheManager(small_config())
    state = cache.get_conv_state(2)
    conv = cupy.asarray(state)
    assert conv.data.ptr == state.__cuda_array_interface__["data"][0]  # shared, not copied
    conv[4] = 1.5
    cupy.cuda.runtime.deviceSynchronize()
    host = to_host(cache.get_conv_state(2))
    assert (host[4] == 1.5).all() and not host[:4].any()


@needs_gpu
def test_scatter_and_clear_capture_into_a_cuda_graph(rng):
    """Captured on a user's stream with accept_lengths on the device, replayed with new values."""
    from cuda.bindings import driver

    def check(result):
        assert result[0] == driver.CUresult.CUDA_SUCCESS, result
        return result[1:] if len(result) > 2 else (result[1] if len(result) == 2 else None)

    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    stream = cuda.stream()
    acc = cuda.to_device(np.zeros(4, dtype=np.int32), stream=stream)
    dev.reshape_intermediate_states(4, 3)
    ref.reshape_intermediate_states(4, 3)
    dev.scatter_mtp_states(acc, stream=stream)  # first call prepares the launch outside capture
    stream.synchronize()
    handle = int(stream.handle)
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    dev.scatter_mtp_states(acc, stream=stream)
    graph = check(driver.cuStreamEndCapture(handle))
    exec_graph = check(driver.cuGraphInstantiate(graph, 0))
    for _ in range(3):
        fill_random([ref, dev], rng)
        values = rng.integers(-1, 5, size=4).astype(np.int32)
        acc.copy_to_device(values, stream=stream)
        check(driver.cuGraphLaunch(exec_graph, handle))
        stream.synchronize()
        ref.scatter_mtp_states(values)
        assert_same_bits(snapshot(ref), snapshot(dev), f"graph replay {values.tolist()}")
    # clear_states captures too
    check(driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL))
    dev.clear_states(stream=stream)
    clear_graph = check(driver.cuGraphInstantiate(check(driver.cuStreamEndCapture(handle)), 0))
    fill_random([dev], rng)
    check(driver.cuGraphLaunch(clear_graph, handle))
    stream.synchronize()
    assert not to_host(dev.pools.recurrent).any() and not to_host(dev.pools.conv).any()


def test_kernels_compile_to_wide_loads_without_local_memory():
    """Compile every kernel to PTX for sm_90 (needs NVVM, not a GPU) and read the code."""
    script = textwrap.dedent("""
        from numba import cuda, types
        from mamba_cache.core import kernels
        w3 = types.uint64[:, :, ::1]
        i1 = types.int32[::1]
        sigs = {
            "scatter_accepted": (w3, w3, w3, w3, types.int64, i1, i1, types.int64, types.int64, types.int64),
            "scatter_tree": (w3, w3, w3, w3, types.int64, types.int32[:, ::1], i1, i1, types.int64, types.int64),
            "copy_slot": (w3, w3, types.int64),
            "zero_words": (types.uint64[::1], types.uint64[::1], types.int64),
            "zero_slot": (w3, w3, types.int64, types.int64),
            "copy_rows_scaled": (*[w3] * 10, *[types.int64] * 4, i1, i1, *[types.int64] * 3),
            "zero_slot_scaled": (*[w3] * 5, *[types.int64] * 5),
        }
        for name, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, name).py_func, sig, cc=(9, 0))
            body = ptx[ptx.index(".entry"):]
            assert ".local" not in body, name + " uses local memory"
            paths = {"scatter_accepted": 2, "scatter_tree": 2, "copy_slot": 1, "zero_words": 2, "zero_slot": 2,
                     "copy_rows_scaled": 5, "zero_slot_scaled": 5}[name]  # fmt: skip
            if not name.startswith("zero"):
                assert body.count("ld.global.u64") == paths * kernels.WORDS_PER_THREAD, name
            assert body.count("st.global.u64") == paths * kernels.WORDS_PER_THREAD, name
            print(name, "ok")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok") == 7
