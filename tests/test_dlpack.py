"""DLPack: the layer tensors export it (zero copy, bfloat16 type code), arguments accept it.

The producer is checked three ways: real consumers on host memory (``numpy.from_dlpack``, and
``torch`` where installed) write through it into the exporting array; the capsule's bytes are read
at the ``dlpack.h`` offsets (not through the library's own ctypes structures) for device tensors,
which no CPU consumer takes; and the deleter is shown to hold the owner exactly until the consumer
lets go. The GPU tests hand the layer tensors to torch / CuPy / JAX and write through them.
"""

from __future__ import annotations

import ctypes
import gc
import weakref

import ml_dtypes
import numpy as np
import pytest
from helpers import BACKENDS, NumbaMambaCacheManager, NumpyMambaCacheManager, needs_gpu, small_config, to_host

from mamba_cache.interop import dlpack

BF16 = np.dtype(ml_dtypes.bfloat16)
_api = ctypes.pythonapi
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
USED_NAMES = {"dltensor": b"used_dltensor", "dltensor_versioned": b"used_dltensor_versioned"}


def read_capsule(capsule) -> dict:
    """The fields of a DLPack capsule, read at the byte offsets of dlpack.h (x86-64 / aarch64 ABI)."""
    name = _api.PyCapsule_GetName(capsule)
    address = _api.PyCapsule_GetPointer(capsule, name)
    versioned = name == b"dltensor_versioned"
    # DLManagedTensorVersioned: version (2 x u32), manager_ctx, deleter, flags (u64), dl_tensor
    tensor = address + (32 if versioned else 0)
    ndim = ctypes.c_int32.from_address(tensor + 16).value
    shape_ptr = ctypes.c_void_p.from_address(tensor + 24).value
    strides_ptr = ctypes.c_void_p.from_address(tensor + 32).value
    fields = {
        "name": name.decode(),
        "data": ctypes.c_void_p.from_address(tensor).value or 0,
        "device": (ctypes.c_int32.from_address(tensor + 8).value, ctypes.c_int32.from_address(tensor + 12).value),
        "ndim": ndim,
        "dtype": (
            ctypes.c_uint8.from_address(tensor + 20).value,
            ctypes.c_uint8.from_address(tensor + 21).value,
            ctypes.c_uint16.from_address(tensor + 22).value,
        ),
        "shape": tuple(ctypes.c_int64.from_address(shape_ptr + 8 * i).value for i in range(ndim)),
        "strides": None
        if not strides_ptr
        else tuple(ctypes.c_int64.from_address(strides_ptr + 8 * i).value for i in range(ndim)),
        "byte_offset": ctypes.c_uint64.from_address(tensor + 40).value,
        "deleter": ctypes.c_void_p.from_address(address + (16 if versioned else 56)).value,
    }
    if versioned:
        fields["version"] = tuple(ctypes.c_uint32.from_address(address + 4 * i).value for i in range(2))
        fields["flags"] = ctypes.c_uint64.from_address(address + 24).value
    return fields


def call_deleter(capsule) -> None:
    """Consume ``capsule`` as a consumer would: rename it ``used_*``, then call its deleter."""
    fields = read_capsule(capsule)
    address = _api.PyCapsule_GetPointer(capsule, fields["name"].encode())
    _api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
    _api.PyCapsule_SetName(capsule, USED_NAMES[fields["name"]])  # the capsule keeps the pointer: never a temporary
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(fields["deleter"])(address)


class Producer:
    """Exports a host array through ``mamba_cache.interop.dlpack.to_capsule`` (CPU device)."""

    def __init__(self, array, versioned: bool | None = None):
        self.array, self.versioned = array, versioned

    def __dlpack_device__(self):
        return (dlpack.KDL_CPU, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        versioned = dlpack.check_export_request((dlpack.KDL_CPU, 0), stream, max_version, dl_device, copy)
        if self.versioned is not None:
            versioned = self.versioned and versioned
        a = self.array
        strides = tuple(s // a.itemsize for s in a.strides)
        return dlpack.to_capsule(a.ctypes.data, a.shape, strides, a.dtype, (1, 0), a, versioned=versioned)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "uint16", "int8"])
@pytest.mark.parametrize("versioned", [True, False])
def test_numpy_consumes_the_producer_zero_copy(rng, dtype, versioned):
    base = rng.integers(1, 100, size=(4, 6, 5)).astype(dtype)
    strided = base[1:, ::2, 1:]  # not contiguous: the strides must travel
    got = np.from_dlpack(Producer(strided, versioned))
    assert got.shape == strided.shape and got.dtype == strided.dtype
    assert got.strides == strided.strides
    assert got.__array_interface__["data"][0] == strided.__array_interface__["data"][0]  # the same memory
    assert (got == strided).all()
    assert got.flags.writeable == versioned  # NumPy imports an unversioned capsule read-only
    if versioned:
        got[0, 0, 0] = 99
        assert base[1, 0, 1] == 99
    else:
        base[1, 0, 1] = 98
        assert got[0, 0, 0] == 98


def test_torch_consumes_the_producer_including_bfloat16(rng):
    torch = pytest.importorskip("torch")
    host = rng.standard_normal((3, 4)).astype(BF16)
    for versioned in (True, False):
        t = torch.from_dlpack(Producer(host, versioned))
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == (3, 4)
        assert t.data_ptr() == host.ctypes.data
        t[2, 3] = 1.5
        assert host[2, 3] == 1.5
    # a plain unversioned capsule, as older consumers take it
    legacy = dlpack.to_capsule(host.ctypes.data, host.shape, None, host.dtype, (1, 0), host)
    assert torch.utils.dlpack.from_dlpack(legacy)[2, 3].item() == 1.5


def test_deleter_keeps_the_owner_alive_until_the_consumer_lets_go():
    class Owner:
        pass

    owner, before = Owner(), dlpack.live_exports()
    alive = weakref.ref(owner)
    data = np.arange(6, dtype=np.float32)
    capsule = dlpack.to_capsule(data.ctypes.data, (6,), None, data.dtype, (2, 0), owner)
    del owner
    gc.collect()
    assert alive() is not None and dlpack.live_exports() == before + 1
    call_deleter(capsule)  # the consumer is done
    gc.collect()
    assert alive() is None and dlpack.live_exports() == before
    del capsule  # a consumed capsule's destructor must not delete twice
    gc.collect()
    assert dlpack.live_exports() == before


@pytest.mark.parametrize("versioned", [True, False])
def test_an_unconsumed_capsule_releases_its_owner(versioned):
    class Owner:
        pass

    owner, before = Owner(), dlpack.live_exports()
    alive = weakref.ref(owner)
    capsule = dlpack.to_capsule(0, (0,), None, np.float32, (2, 0), owner, versioned=versioned)
    del owner, capsule
    gc.collect()
    assert alive() is None and dlpack.live_exports() == before


def test_import_reads_what_the_producer_wrote_and_calls_its_deleter(rng):
    before = dlpack.live_exports()
    host = rng.integers(0, 9, size=(3, 8)).astype(np.int32)[:, ::2]
    view = dlpack.from_dlpack(Producer(host))
    assert view.pointer == host.ctypes.data and view.shape == (3, 4) and view.strides == host.strides
    assert view.dtype == np.int32 and view.device == (dlpack.KDL_CPU, 0)
    assert dlpack.live_exports() == before + 1
    del view
    gc.collect()
    assert dlpack.live_exports() == before
    with pytest.raises(BufferError, match="not an unconsumed DLPack capsule"):
        dlpack.consume_capsule(object())


def test_export_request_refuses_copy_and_another_device():
    with pytest.raises(BufferError, match="zero-copy only"):
        dlpack.check_export_request((2, 0), copy=True)
    with pytest.raises(BufferError, match=r"dl_device=\(2, 1\) but the tensor lives on \(2, 0\)"):
        dlpack.check_export_request((2, 0), dl_device=(2, 1))
    with pytest.raises(TypeError, match="stream must be None or an int"):
        dlpack.check_export_request((2, 0), stream="s")
    assert dlpack.check_export_request((2, 0), max_version=(1, 0)) is True
    assert dlpack.check_export_request((2, 0), max_version=None) is False


# ------------------------------------------------------------------ what the managers hand out
def handed_out(cache) -> dict:
    """Every kind of tensor a manager hands out, by name, with the dtype the cache says it holds."""
    config = cache.get_config()
    tensors = {
        "recurrent": (cache.get_recurrent_state(1), config.recurrent_state_dtype),
        "conv": (cache.get_conv_state(2), config.conv_state_dtype),
        "captured recurrent": (cache.capture_recurrent_states(3)[1], config.recurrent_state_dtype),
        "captured conv": (cache.capture_conv_states(0)[2], config.conv_state_dtype),
    }
    if cache.has_intermediate_recurrent_states():
        cache.reshape_intermediate_states(3, 2)
        tensors["intermediate recurrent"] = (
            cache.get_intermediate_recurrent_state(0),
            config.intermediate_recurrent_state_dtype,
        )
        tensors["intermediate conv"] = (cache.get_intermediate_conv_state(1), config.intermediate_conv_state_dtype)
    if cache.has_replay_stash():
        for name, view in cache.get_replay_stash(2).items():
            tensors[f"stash {name}"] = (view, config.replay_stash_fields[name][1])
    return tensors


def pointer_of(array) -> int:
    if isinstance(array, np.ndarray):
        return array.ctypes.data
    if hasattr(array, "_ary"):  # the CUDA simulator: device memory is a host buffer
        return array._ary.ctypes.data
    return array.__cuda_array_interface__["data"][0]


CONFIGS = {
    "f32/f16": dict(),
    "bf16": dict(recurrent_state_dtype="bfloat16", conv_state_dtype="bfloat16"),
    "replay": dict(commit_mode="replay", conv_state_dtype="float32"),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("versioned", [True, False])
def test_handed_out_tensors_export_their_memory(backend, config, versioned):
    cache = BACKENDS[backend](small_config(**CONFIGS[config]))
    device = (dlpack.KDL_CPU, 0) if backend == "numpy" else (dlpack.KDL_CUDA, cache.device_id)
    for name, (tensor, dtype) in handed_out(cache).items():
        assert tensor.__dlpack_device__() == device, name
        capsule = tensor.__dlpack__(max_version=(1, 0) if versioned else None)
        fields = read_capsule(capsule)
        assert fields["name"] == ("dltensor_versioned" if versioned else "dltensor"), name
        assert fields["device"] == device, name
        code, bits, lanes = fields["dtype"]
        if dtype == BF16:
            assert (code, bits, lanes) == (dlpack.KDL_BFLOAT, 16, 1), name
        else:
            want = {"f": dlpack.KDL_FLOAT, "i": dlpack.KDL_INT, "u": dlpack.KDL_UINT}[np.dtype(dtype).kind]
            assert (code, bits, lanes) == (want, dtype.itemsize * 8, 1), name
        assert fields["shape"] == tuple(tensor.shape), name
        itemsize = np.dtype(dtype).itemsize
        shape = tuple(tensor.shape)
        if fields["strides"] is not None:  # a stride of a length-1 axis is never used
            pairs = zip(fields["strides"], tensor.strides, shape, strict=True)
            assert all(s == t // itemsize for s, t, n in pairs if n > 1), name
        assert fields["data"] + fields["byte_offset"] == pointer_of(tensor), name
        if versioned:
            assert fields["version"][0] == 1 and fields["flags"] == 0, name
        if backend == "numba" or dtype == BF16:  # our producer (NumPy exports the rest itself)
            before = dlpack.live_exports()
            call_deleter(capsule)
            assert dlpack.live_exports() == before - 1, name


def test_numpy_backend_tensors_are_shared_with_numpy_and_torch(rng):
    cache = NumpyMambaCacheManager(small_config(conv_state_dtype="bfloat16"))
    state = np.from_dlpack(cache.get_recurrent_state(1))
    state[...] = 2.5
    assert (cache.pools.recurrent[1] == 2.5).all() and not cache.pools.recurrent[0].any()
    torch = pytest.importorskip("torch")
    conv = torch.from_dlpack(cache.get_conv_state(0))
    assert conv.dtype == torch.bfloat16 and conv.data_ptr() == cache.pools.conv[0].ctypes.data
    conv[3] = -1.25
    assert (cache.pools.conv[0, 3] == -1.25).all() and not cache.pools.conv[0, 2].astype(np.float32).any()


def test_numba_bfloat16_pools_stay_uint16_to_numba():
    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="bfloat16"))
    state = cache.get_recurrent_state(0)
    assert state.dtype == np.uint16  # what Numba kernels and __cuda_array_interface__ see
    assert read_capsule(state.__dlpack__())["dtype"] == (dlpack.KDL_BFLOAT, 16, 1)
    assert to_host(state).dtype == np.uint16


# ------------------------------------------------------------------ real consumers on the GPU
@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_from_dlpack_is_zero_copy_on_the_gpu(dtype):
    torch = pytest.importorskip("torch")
    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype=dtype))
    state = cache.get_recurrent_state(1)
    view = torch.from_dlpack(state)
    assert view.dtype == getattr(torch, dtype) and view.device == torch.device("cuda", cache.device_id)
    assert view.data_ptr() == state.__cuda_array_interface__["data"][0]
    view.fill_(1.5)  # exactly representable in every dtype
    torch.cuda.synchronize()
    host = to_host(cache.get_recurrent_state(1)).view(cache.get_config().recurrent_state_dtype)
    assert (host.astype(np.float32) == 1.5).all()
    assert not to_host(cache.get_recurrent_state(0)).any()
    captured = cache.capture_recurrent_states(1)  # slot 1 of every layer; layer 1 was filled above
    layer1, layer0 = torch.from_dlpack(captured[1]), torch.from_dlpack(captured[0])
    assert layer1.dtype == getattr(torch, dtype) and (layer1.float() == 1.5).all()
    assert not layer0.float().any()


@needs_gpu
def test_cupy_from_dlpack_is_zero_copy_on_the_gpu():
    cupy = pytest.importorskip("cupy")
    cache = NumbaMambaCacheManager(small_config())
    state = cache.get_conv_state(2)
    conv = cupy.from_dlpack(state)
    assert conv.data.ptr == state.__cuda_array_interface__["data"][0] and conv.dtype == np.float16
    conv[4] = 1.5
    cupy.cuda.runtime.deviceSynchronize()
    host = to_host(cache.get_conv_state(2))
    assert (host[4] == 1.5).all() and not host[:4].any()


@needs_gpu
def test_jax_dlpack_is_zero_copy_on_the_gpu():
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to the other tests
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax has no GPU backend here")
    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="bfloat16"))
    state = cache.get_recurrent_state(1)
    array = jax.dlpack.from_dlpack(state)
    assert str(array.dtype) == "bfloat16" and array.shape == tuple(state.shape)
    pointer = array.unsafe_buffer_pointer()
    assert pointer == state.__cuda_array_interface__["data"][0]  # jax arrays are immutable: shared, not copied


@needs_gpu
def test_cuda_core_reads_the_capsule_as_we_describe_it():
    from cuda.core.utils import StridedMemoryView

    cache = NumbaMambaCacheManager(small_config(recurrent_state_dtype="bfloat16"))
    state = cache.get_intermediate_recurrent_state(2)
    view = StridedMemoryView.from_dlpack(state, stream_ptr=-1)
    assert view.ptr == state.__cuda_array_interface__["data"][0]
    assert tuple(view.shape) == tuple(state.shape) and view.dtype == BF16 and view.device_id == cache.device_id


# ------------------------------------------------------------------ accepting DLPack-only arguments
class DLPackOnly:
    """Exposes an array through ``__dlpack__`` / ``__dlpack_device__`` only (as a JAX array may).

    ``array`` is a host array (NumPy backend) or a Numba device array; under the CUDA simulator the
    device memory is a host buffer, exported as kDLCUDA memory like the real thing.
    """

    def __init__(self, array, device=None, dtype=None):
        self.array = array
        self.device = device
        self.dtype = dtype  # what the capsule says, when it differs (bfloat16 over uint16 bits)
        self.streams = []

    def __dlpack_device__(self):
        if self.device is not None:
            return self.device
        if isinstance(self.array, np.ndarray):
            return (dlpack.KDL_CPU, 0)
        return (dlpack.KDL_CUDA, 0)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        a = self.array
        strides = tuple(s // a.dtype.itemsize for s in a.strides)
        versioned = max_version is not None and max_version[0] >= 1
        dtype = self.dtype or a.dtype
        return dlpack.to_capsule(
            pointer_of(a), tuple(a.shape), strides, dtype, self.__dlpack_device__(), a, versioned=versioned
        )


def dlpack_only(backend, values, **kwargs):
    host = np.ascontiguousarray(values)
    if backend == "numpy":
        return DLPackOnly(host, **kwargs)
    from numba import cuda

    return DLPackOnly(cuda.to_device(host), **kwargs)


def test_dlpack_only_index_arrays_drive_every_commit(backend, rng):
    from helpers import assert_same_bits, fill_random, snapshot

    config = small_config()
    ref, cache = NumpyMambaCacheManager(config), BACKENDS[backend](config)
    before, held = dlpack.live_exports(), []
    for round_ in range(3):
        fill_random([ref, cache], rng)
        accept = rng.integers(-1, 5, size=4).astype(np.int32)
        indices = rng.permutation(5)[:4].astype(np.int32)
        nodes = rng.integers(-1, 4, size=(4, 3)).astype(np.int32)
        src, dst = np.array([0, 9], np.int32), np.array([4, 1], np.int32)
        ref.scatter_mtp_states(accept, state_indices=indices)
        cache.scatter_mtp_states(dlpack_only(backend, accept), state_indices=dlpack_only(backend, indices))
        ref.scatter_accepted_tree_states(nodes, accept)
        cache.scatter_accepted_tree_states(dlpack_only(backend, nodes), dlpack_only(backend, accept))
        ref.copy_slots(src, dst)
        cache.copy_slots(dlpack_only(backend, src), dlpack_only(backend, dst))
        if backend == "numba":
            from helpers import sync

            sync()
        assert_same_bits(snapshot(ref), snapshot(cache), f"round {round_}")
        gc.collect()
        held.append(dlpack.live_exports() - before)
    # A launch may hold the arrays of its latest call (the simulator's dispatcher launch does): no more
    assert held[-1] == held[0] <= 6, held
    cache.close()
    gc.collect()
    assert dlpack.live_exports() == before, "an imported tensor's deleter was not called"


def test_numba_passes_its_stream_to_the_producer():
    from numba import cuda

    cache = NumbaMambaCacheManager(small_config())
    accept = dlpack_only("numba", np.zeros(3, np.int32))
    cache.scatter_mtp_states(accept)
    cache.scatter_mtp_states(accept, cuda.stream())
    assert accept.streams and all(isinstance(s, int) and s != 0 for s in accept.streams)  # 0 is not a DLPack stream


def test_a_host_dlpack_index_array_is_staged_by_the_numba_backend(rng):
    from helpers import assert_same_bits, fill_random, snapshot, sync

    config = small_config()
    ref, cache = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    fill_random([ref, cache], rng)
    accept = np.array([2, 0, 3, 1], np.int32)
    ref.scatter_mtp_states(accept)
    cache.scatter_mtp_states(DLPackOnly(accept))  # kDLCPU: copied to the device like a numpy array
    sync()
    assert_same_bits(snapshot(ref), snapshot(cache), "host DLPack")


@pytest.mark.parametrize(
    "case", ["int64", "2-D", "strided", "other device type", "other GPU", "float bits"], ids=lambda c: c
)
def test_bad_dlpack_index_arrays_are_refused_before_anything_changes(backend, rng, case):
    from helpers import assert_same_bits, fill_random, snapshot

    cache = BACKENDS[backend](small_config())
    fill_random([cache], rng)
    device_kind = (dlpack.KDL_CPU, 0) if backend == "numpy" else (dlpack.KDL_CUDA, 0)
    if case == "int64":
        arg, error, message = dlpack_only(backend, np.zeros(4, np.int64)), TypeError, "must have dtype int32, got int64"
    elif case == "2-D":
        arg, error, message = dlpack_only(backend, np.zeros((2, 2), np.int32)), ValueError, r"must be 1-D \[active\]"
    elif case == "strided":
        arg = dlpack_only(backend, np.zeros(8, np.int32))
        arg.array = arg.array[::2]
        error, message = ValueError, "accept_lengths must be contiguous"
    elif case == "other device type":
        arg = dlpack_only(backend, np.zeros(4, np.int32), device=(10, 0))  # kDLROCM
        error, message = TypeError, "device type 10"
    elif case == "other GPU":
        if backend == "numpy":
            pytest.skip("the NumPy backend takes host memory only (covered by 'other device type')")
        arg = dlpack_only(backend, np.zeros(4, np.int32), device=(dlpack.KDL_CUDA, 1))
        error, message = TypeError, r"accept_lengths must be on GPU 0 \(the manager's\), got a DLPack tensor on GPU 1"
    else:  # float32 bits said to be float: the dtype check sees float32
        arg = dlpack_only(backend, np.zeros(4, np.float32), device=device_kind)
        error, message = TypeError, "must have dtype int32, got float32"
    before = snapshot(cache)
    with pytest.raises(error, match=message):
        cache.scatter_mtp_states(arg)
    assert_same_bits(snapshot(cache), before, case)


def test_dlpack_only_outputs_and_states(backend, rng):
    """capture_states(out=) and restore_slot take DLPack-only tensors; bfloat16 ones for bfloat16 pools."""
    from helpers import fill_random, snapshot

    dtypes = ("bfloat16", "float16") if backend == "numba" else ("float32", "float16")
    cache = BACKENDS[backend](small_config(recurrent_state_dtype=dtypes[0], conv_state_dtype=dtypes[1]))
    fill_random([cache], rng)
    pools = snapshot(cache)
    shapes = [(p.shape[0], 1, *p.shape[2:]) for p in (pools["recurrent"], pools["conv"])]
    raw = [np.zeros(s, pools[k].dtype) for s, k in zip(shapes, ("recurrent", "conv"), strict=True)]
    bf16 = BF16 if dtypes[0] == "bfloat16" else None
    out = (dlpack_only(backend, raw[0], dtype=bf16), dlpack_only(backend, raw[1]))
    assert cache.capture_states(3, out=out) is out
    assert to_host(out[0].array).tobytes() == pools["recurrent"][:, 3:4].tobytes()
    assert to_host(out[1].array).tobytes() == pools["conv"][:, 3:4].tobytes()
    # and back into another slot, one layer at a time
    states = [
        [dlpack_only(backend, pools[k][layer, 3:4], dtype=bf16 if k == "recurrent" else None) for layer in range(3)]
        for k in ("recurrent", "conv")
    ]
    cache.restore_slot(0, *states)
    after = snapshot(cache)
    for kind in ("recurrent", "conv"):
        assert after[kind][:, 0].tobytes() == pools[kind][:, 3].tobytes(), kind
    wrong = dlpack_only(backend, np.zeros(shapes[1], np.float16), dtype=BF16)  # bfloat16 into a float16 pool
    message = r" must have dtype float16 \(the pool's\), got bfloat16"
    if backend == "numpy":  # NumPy cannot read a bfloat16 capsule
        message = ": could not import it"
    with pytest.raises(TypeError, match=r"out\[1\]" + message):
        cache.capture_states(0, out=(out[0], wrong))


@needs_gpu
def test_torch_and_jax_index_arrays_seen_only_through_dlpack(rng):
    from helpers import assert_same_bits, fill_random, snapshot

    torch = pytest.importorskip("torch")

    class Only:  # hides __cuda_array_interface__ and the torch type: the generic DLPack path
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, **kwargs):
            return self.tensor.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    config = small_config()
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    side = torch.cuda.Stream()
    for round_ in range(3):
        fill_random([ref, dev], rng)
        accept = rng.integers(-1, 5, size=4).astype(np.int32)
        indices = rng.permutation(5)[:4].astype(np.int32)
        with torch.cuda.stream(side):  # written on another stream: the producer orders it before ours
            acc, idx = (Only(torch.from_numpy(a).cuda(non_blocking=True)) for a in (accept, indices))
        dev.scatter_mtp_states(acc, torch.cuda.current_stream(), state_indices=idx)
        torch.cuda.synchronize()
        ref.scatter_mtp_states(accept, state_indices=indices)
        assert_same_bits(snapshot(ref), snapshot(dev), f"round {round_}")
    with pytest.raises(TypeError, match="accept_lengths must have dtype int32, got int64"):
        dev.scatter_mtp_states(Only(torch.zeros(4, dtype=torch.int64, device="cuda")))
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax has no GPU backend here")
    accept = np.array([2, 0, 3, 1], np.int32)
    fill_random([ref, dev], rng)
    dev.scatter_mtp_states(jax.device_put(accept, jax.devices("gpu")[0]))
    ref.scatter_mtp_states(accept)
    from helpers import sync

    sync()
    assert_same_bits(snapshot(ref), snapshot(dev), "jax")
