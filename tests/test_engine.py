"""Life inside an engine: capture into caller-provided outputs, streams and tensors as engines pass them.

The GPU tests compare every pool with the NumPy reference after calls whose arguments come the
way a PyTorch engine passes them: a new stream object (or a new int handle) every call, torch /
CuPy index tensors, one reused capture buffer captured in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    ON_GPU,
    NumbaMambaCacheManager,
    NumpyMambaCacheManager,
    assert_same_bits,
    fill_random,
    needs_gpu,
    small_config,
    snapshot,
    to_host,
)


def empty_like_capture(backend, manager, kind):
    pool = getattr(manager.pools, kind)
    shape = (pool.shape[0], 1, *pool.shape[2:])
    if backend == "numpy":
        return np.full(shape, 7, dtype=pool.dtype)
    from numba import cuda

    return cuda.to_device(np.full(shape, 7, dtype=pool.dtype))


@pytest.mark.parametrize("kind", ["recurrent", "conv"])
def test_capture_into_out_matches_the_allocating_capture(backend, rng, kind):
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    out = empty_like_capture(backend, cache, kind)
    before = snapshot(cache)
    for slot in (0, 4, 2):
        got = getattr(cache, f"capture_{kind}_states")(slot, out=out)
        assert got is out
        want = np.stack([to_host(a) for a in getattr(cache, f"capture_{kind}_states")(slot)])
        assert to_host(out).tobytes() == want.tobytes(), slot
        assert to_host(out).tobytes() == before[kind][:, slot : slot + 1].tobytes(), slot
    assert_same_bits(snapshot(cache), before, "capture must not change the pools")


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda shape, dtype: np.zeros(shape[1:], dtype), ValueError, r"out must have shape \[3, 1, 2, 3, 5\]"),
        (lambda shape, dtype: np.zeros(shape, np.float64), TypeError, "out must have dtype float32"),
        (lambda shape, dtype: [np.zeros(shape[1:], dtype)], TypeError, "out must be"),
    ],
    ids=["shape", "dtype", "list"],
)
def test_capture_into_bad_out_is_refused(backend, rng, make, error, message):
    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    pool = cache.pools.recurrent
    host = make((pool.shape[0], 1, *pool.shape[2:]), pool.dtype)
    if backend == "numba" and isinstance(host, np.ndarray):
        from numba import cuda

        host = cuda.to_device(host)
    before = snapshot(cache)
    with pytest.raises(error, match=message):
        cache.capture_recurrent_states(1, out=host)
    assert_same_bits(snapshot(cache), before, "refused capture")


def test_numba_capture_refuses_a_host_out(rng):
    cache = NumbaMambaCacheManager(small_config())
    with pytest.raises(TypeError, match="out must be a device array"):
        cache.capture_conv_states(0, out=np.zeros((3, 1, 7, 3), np.float16))


@needs_gpu
def test_capture_into_out_replays_from_a_cuda_graph(rng):
    from cuda.bindings import driver
    from numba import cuda

    cache = NumbaMambaCacheManager(small_config())
    out = cuda.device_array((3, 1, 2, 3, 5), dtype=np.float32)
    stream = cuda.stream()
    cache.capture_recurrent_states(0, stream, out=out)  # prepares the launch outside the capture
    stream.synchronize()
    handle = int(stream.handle)
    assert driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)[0] == 0
    cache.capture_recurrent_states(3, stream, out=out)
    err, graph = driver.cuStreamEndCapture(handle)
    assert err == 0
    err, exec_graph = driver.cuGraphInstantiate(graph, 0)
    assert err == 0
    for _ in range(2):
        fill_random([cache], rng)
        assert driver.cuGraphLaunch(exec_graph, handle)[0] == 0
        stream.synchronize()
        assert to_host(out).tobytes() == to_host(cache.pools.recurrent)[:, 3:4].tobytes()


@needs_gpu
def test_torch_streams_and_tensors_as_an_engine_passes_them(rng):
    torch = pytest.importorskip("torch")
    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    side = torch.cuda.Stream()
    for round_ in range(6):
        fill_random([ref, dev], rng)
        values = rng.integers(-1, 5, size=4).astype(np.int32)
        accept = torch.from_numpy(values).cuda()  # a new tensor every call
        stream = [
            None,
            torch.cuda.current_stream(),  # a new Python object every call
            side,
            int(side.cuda_stream),  # a new int every call
            torch.cuda.current_stream().cuda_stream,
            torch.cuda.default_stream(),
        ][round_]
        with torch.cuda.stream(side if round_ in (2, 3) else torch.cuda.current_stream()):
            dev.scatter_mtp_states(accept, stream)
            dev.clear_slot(int(values[0]) % 5, stream)
        torch.cuda.synchronize()
        ref.scatter_mtp_states(values)
        ref.clear_slot(int(values[0]) % 5)
        assert_same_bits(snapshot(ref), snapshot(dev), f"round {round_}")
    with pytest.raises(TypeError, match="accept_lengths must have dtype int32, got int64"):
        dev.scatter_mtp_states(torch.zeros(2, dtype=torch.int64, device="cuda"))
    with pytest.raises(TypeError, match="accept_lengths must be on the GPU"):
        dev.scatter_mtp_states(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="accept_lengths must be contiguous"):
        dev.scatter_mtp_states(torch.zeros(8, dtype=torch.int32, device="cuda")[::2])


@needs_gpu
def test_a_reused_tensor_is_checked_again_when_it_changed(rng):
    # The Numba backend reuses the check of an index array passed again; a torch tensor can be
    # re-pointed (set_), resized (resize_) or restrided (as_strided_) in place, and a CuPy array
    # reshaped in place: each change must be seen, never the old pointer or shape launched.
    torch = pytest.importorskip("torch")
    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    fill_random([ref, dev], rng)
    accept = torch.tensor([1, 0, 2, 0], dtype=torch.int32, device="cuda")
    dev.scatter_mtp_states(accept)
    ref.scatter_mtp_states(accept.cpu().numpy())
    other = torch.tensor([0, 3, 0, 1], dtype=torch.int32, device="cuda")
    accept.set_(other.untyped_storage(), 0, (4,))  # same object, new memory
    dev.scatter_mtp_states(accept)
    ref.scatter_mtp_states(other.cpu().numpy())
    accept.resize_(2)  # same object and pointer, new shape
    dev.scatter_mtp_states(accept)
    ref.scatter_mtp_states(other[:2].cpu().numpy())
    torch.cuda.synchronize()
    assert_same_bits(snapshot(ref), snapshot(dev), "a tensor changed in place")
    accept.as_strided_((2,), (2,))  # same pointer and shape, not contiguous any more
    with pytest.raises(ValueError, match="accept_lengths must be contiguous"):
        dev.scatter_mtp_states(accept)
    cupy = pytest.importorskip("cupy")
    indices = cupy.asarray(np.array([[2, 0], [1, 3]], dtype=np.int32))
    flat = indices.reshape(4)
    dev.scatter_mtp_states(cupy.asarray(np.array([1, 1, 1, 1], dtype=np.int32)), state_indices=flat)
    flat.shape = (2, 2)  # same object, reshaped in place: no longer [active]
    with pytest.raises(ValueError, match="state_indices"):
        dev.scatter_mtp_states(cupy.asarray(np.array([1, 1, 1, 1], dtype=np.int32)), state_indices=flat)


@needs_gpu
def test_cupy_index_arrays(rng):
    cupy = pytest.importorskip("cupy")
    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    fill_random([ref, dev], rng)
    values = np.array([3, 0, 2, 1], dtype=np.int32)
    indices = np.array([4, 1, 0, 2], dtype=np.int32)
    dev.scatter_mtp_states(cupy.asarray(values), state_indices=cupy.asarray(indices))
    cupy.cuda.runtime.deviceSynchronize()
    ref.scatter_mtp_states(values, state_indices=indices)
    assert_same_bits(snapshot(ref), snapshot(dev), "cupy")


@needs_gpu
def test_manager_called_from_another_thread(rng):
    import threading

    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config, device=0)
    fill_random([ref, dev], rng)
    values = np.array([3, 1, 0, 2], dtype=np.int32)
    errors = []

    def work():
        try:
            dev.scatter_mtp_states(values)  # a thread that never used CUDA: no context is current
            dev.clear_slot(4)
            from numba import cuda

            cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    ref.scatter_mtp_states(values)
    ref.clear_slot(4)
    assert_same_bits(snapshot(ref), snapshot(dev), "from another thread")


@needs_gpu
def test_prefix_store_called_from_another_thread(rng):
    # The store's device work (its allocation, copies, host-tier transfers) runs with its manager's
    # context current, as the manager's own calls do: a thread that never used CUDA works too.
    import threading

    from mamba_cache.prefix import PrefixStateCache

    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config, device=0)
    fill_random([ref, dev], rng)
    tokens = np.arange(3 * 8, dtype=np.int32)
    stores, errors = {}, []

    def work():
        try:
            from numba import cuda

            for name, manager in (("ref", ref), ("dev", dev)):
                store = stores[name] = PrefixStateCache(manager, entries=1, block_size=8, host_entries=2)
                store.insert(tokens[:8], 1)
                store.insert(tokens[:16], 2)  # evicts the first prefix to the host tier
                store.restore(store.match(tokens[:9]), 3)  # a host-to-device restore
                store.restore_many([store.match(tokens)], np.array([4], dtype=np.int32))
            cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    assert stores["dev"].stats.hits == stores["ref"].stats.hits == 2
    assert_same_bits(snapshot(ref), snapshot(dev), "a store used from another thread")


def gpu_count() -> int:
    if not ON_GPU:
        return 0
    from numba import cuda

    return len(cuda.gpus)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two CUDA GPUs (runs on the two-GPU machine)")
def test_two_managers_on_two_gpus_do_not_interfere(rng):
    from numba import cuda

    config = small_config()
    refs = [NumpyMambaCacheManager(config) for _ in range(2)]
    devs = [NumbaMambaCacheManager(config, device=i) for i in range(2)]
    assert [d.device_id for d in devs] == [0, 1]
    for ref, dev in zip(refs, devs, strict=True):
        fill_random([ref, dev], rng)
    with cuda.gpus[1]:  # the other GPU's context is current while device 0's manager works
        devs[0].scatter_mtp_states(np.array([2, 3, 1, 0], dtype=np.int32))
        refs[0].scatter_mtp_states(np.array([2, 3, 1, 0], dtype=np.int32))
    with cuda.gpus[0]:
        devs[1].clear_slot(2)
        refs[1].clear_slot(2)
        out = devs[1].capture_conv_states(1)
    for i in range(2):
        with cuda.gpus[i]:
            cuda.synchronize()
        assert_same_bits(snapshot(refs[i]), snapshot(devs[i]), f"gpu {i}")
    with cuda.gpus[1]:  # a Numba array is copied within its own device's context
        assert to_host(out[0]).tobytes() == refs[1].pools.conv[0, 1:2].tobytes()
    with pytest.raises(ValueError, match=r"device must be in \[0, 2\)"):
        NumbaMambaCacheManager(config, device=2)
