"""Array classes that add ``__dlpack__`` to what the backends hand out.

Design choice: the Numba backend's layer tensors stay Numba device arrays (a ``DeviceNDArray``
subclass, or under the CUDA simulator a ``FakeCUDAArray`` subclass), so everything that takes a
Numba array (kernels, ``copy_to_host``, ``__cuda_array_interface__`` consumers, ``isinstance``
checks) takes them unchanged; the subclass only adds ``__dlpack__`` / ``__dlpack_device__``.
A bfloat16 pool is ``uint16`` raw bits to Numba (it has no bfloat16 type), and its views export
the DLPack bfloat16 type code, so ``torch.from_dlpack`` gives ``torch.bfloat16`` without a copy.
On the GPU, views derived with ``reshape`` / ``[...]`` keep the class (Numba builds them with
``type(self)``); ``.view(dtype)`` gives a plain Numba array.

The NumPy backend's arrays export DLPack natively except bfloat16 (NumPy refuses to export an
``ml_dtypes`` dtype): bfloat16 views are `BFloat16HostArray`, an ``ndarray`` subclass whose
``__dlpack__`` writes the bfloat16 type code.

Streams: the exported capsule names no stream (like the manager's ``__cuda_array_interface__``);
the consumer's ``stream`` argument is accepted and ignored: order your work through the
``stream=`` arguments of the manager's calls, as with ``__cuda_array_interface__``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dlpack import KDL_CPU, KDL_CUDA, RAW_CODES, check_export_request, element_strides, to_capsule


class BFloat16HostArray(np.ndarray):
    """A host ``ndarray`` of ``ml_dtypes.bfloat16`` (or float8) that exports DLPack with its type code.

    ``kDLBfloat`` (16 bits), ``kDLFloat8_e4m3fn`` or ``kDLFloat8_e5m2`` (8 bits); any other dtype
    (after ``.view(...)``) exports through NumPy's own ``__dlpack__``.
    """

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCPU, 0)``."""
        return (KDL_CPU, 0)

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None):
        """A DLPack capsule of this array, zero copy (see ``mamba_cache.interop.dlpack.to_capsule``)."""
        if self.dtype.name not in RAW_CODES:
            return np.asarray(self).__dlpack__(stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)
        versioned = check_export_request((KDL_CPU, 0), stream, max_version, dl_device, copy)
        strides = element_strides(self.shape, self.strides, self.itemsize)
        device, read_only = (KDL_CPU, 0), not self.flags.writeable
        return to_capsule(
            self.ctypes.data, self.shape, strides, self.dtype, device, self, versioned=versioned, read_only=read_only
        )


def host_export(array: np.ndarray) -> np.ndarray:
    """``array`` itself, or for bfloat16 / float8 a `BFloat16HostArray` view of it (same memory)."""
    if array.dtype.name in RAW_CODES and not isinstance(array, BFloat16HostArray):
        return array.view(BFloat16HostArray)
    return array


class _DLPackExport:
    """``__dlpack__`` / ``__dlpack_device__`` for a Numba device array (kDLCUDA)."""

    #: The dtype consumers see when it differs from the array's (bfloat16 over uint16 raw bits).
    _dlpack_dtype: Any = None

    def _dlpack_pointer(self) -> int:
        raise NotImplementedError

    def _dlpack_device_id(self) -> int:
        raise NotImplementedError

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(kDLCUDA, device ordinal)``."""
        return (KDL_CUDA, self._dlpack_device_id())

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None, copy: Any = None):
        """A DLPack capsule of this device array, zero copy; keeps the array alive until deleted.

        Args:
            stream: the consumer's stream; accepted and not used (the cache's work is ordered by
                the ``stream=`` of its calls, as with ``__cuda_array_interface__``).
            max_version: ``(1, x)`` or later gives a versioned capsule, else ``"dltensor"``.
            dl_device: must be this array's device if given.
            copy: ``True`` is refused (``BufferError``): the export is zero copy.
        """
        device = self.__dlpack_device__()
        versioned = check_export_request(device, stream, max_version, dl_device, copy)
        dtype = self.dtype
        if self._dlpack_dtype is not None and dtype == np.dtype(f"u{self._dlpack_dtype.itemsize}"):
            dtype = self._dlpack_dtype
        shape = tuple(int(n) for n in self.shape)
        strides = element_strides(shape, tuple(int(s) for s in self.strides), self.dtype.itemsize)
        return to_capsule(self._dlpack_pointer(), shape, strides, dtype, device, self, versioned=versioned)


def numba_classes(simulator: bool) -> tuple[type, type]:
    """``(plain, bfloat16)`` DLPack-exporting Numba array classes for the target in use."""
    key = bool(simulator)
    classes = _CLASSES.get(key)
    if classes is None:
        classes = _CLASSES[key] = _make_classes(key)
    return classes


_CLASSES: dict = {}


def _make_classes(simulator: bool) -> tuple[type, type]:
    import ml_dtypes

    if simulator:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        class SimulatedDLPackArray(_DLPackExport, FakeCUDAArray):
            """A simulated device array exporting DLPack as kDLCUDA memory (its host buffer's address)."""

            def _dlpack_pointer(self) -> int:
                return int(self._ary.ctypes.data)

            def _dlpack_device_id(self) -> int:
                return 0

        plain = SimulatedDLPackArray
    else:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        class DLPackDeviceArray(_DLPackExport, DeviceNDArray):
            """A ``DeviceNDArray`` that also exports DLPack."""

            def _dlpack_pointer(self) -> int:
                return int(self.device_ctypes_pointer.value or 0)

            def _dlpack_device_id(self) -> int:
                return int(self.gpu_data.context.device.id)

        plain = DLPackDeviceArray

    class BFloat16DLPackArray(plain):
        """uint16 raw bits of a bfloat16 pool; DLPack consumers see bfloat16."""

        _dlpack_dtype = np.dtype(ml_dtypes.bfloat16)

    class Float8E4M3DLPackArray(plain):
        """uint8 raw bits of a float8_e4m3fn pool; DLPack consumers see float8_e4m3fn."""

        _dlpack_dtype = np.dtype(ml_dtypes.float8_e4m3fn)

    class Float8E5M2DLPackArray(plain):
        """uint8 raw bits of a float8_e5m2 pool; DLPack consumers see float8_e5m2."""

        _dlpack_dtype = np.dtype(ml_dtypes.float8_e5m2)

    for cls in (plain, BFloat16DLPackArray, Float8E4M3DLPackArray, Float8E5M2DLPackArray):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__
    _RAW_CLASSES[simulator] = {
        "bfloat16": BFloat16DLPackArray,
        "float8_e4m3fn": Float8E4M3DLPackArray,
        "float8_e5m2": Float8E5M2DLPackArray,
    }
    return plain, BFloat16DLPackArray


_RAW_CLASSES: dict = {}


def numba_export(array: Any, dtype: Any, simulator: bool) -> Any:
    """``array`` (a Numba device array) as the DLPack-exporting class, same memory.

    Args:
        array: a ``DeviceNDArray`` (or simulated one); bfloat16 / float8 pools are its uint16 / uint8 raw bits.
        dtype: the dtype the array holds for the cache (``ml_dtypes.bfloat16``, ``float8_e4m3fn``, ``float8_e5m2``).
        simulator: whether Numba runs in its CUDA simulator.
    """
    plain, _ = numba_classes(simulator)
    cls = _RAW_CLASSES[bool(simulator)].get(np.dtype(dtype).name, plain)
    if type(array) is cls:
        return array
    if simulator:
        return cls(array._ary, stream=array.stream)
    return cls(array.shape, array.strides, array.dtype, stream=array.stream, gpu_data=array.gpu_data)


def numba_array(view: Any, simulator: bool) -> Any:
    """A Numba device array over an imported, C-contiguous DLPack tensor (bfloat16 as uint16 raw bits).

    The array holds ``view.keeper``, so the producer's deleter runs only once the array is gone.

    Args:
        view: a `mamba_cache.interop.dlpack.DLPackView` of CUDA memory (under the CUDA
            simulator: of host memory, which is what the simulator's device memory is).
        simulator: whether Numba runs in its CUDA simulator.
    """
    import ctypes

    from numba import cuda

    dtype = np.dtype(np.uint16) if view.dtype.name == "bfloat16" else view.dtype
    nbytes = int(np.prod(view.shape)) * dtype.itemsize
    if simulator:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        if nbytes:
            host = np.frombuffer((ctypes.c_char * nbytes).from_address(view.pointer), dtype=dtype).reshape(view.shape)
        else:
            host = np.empty(view.shape, dtype)
        array = FakeCUDAArray(host)
        array._dlpack_keeper = view.keeper
        return array
    from cuda.bindings import driver
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    from numba.cuda.cudadrv.driver import MemoryPointer

    memory = MemoryPointer(cuda.current_context(), driver.CUdeviceptr(view.pointer), nbytes)
    memory._dlpack_keeper = view.keeper
    strides = tuple(int(np.prod(view.shape[i + 1 :])) * dtype.itemsize for i in range(len(view.shape)))
    return DeviceNDArray(view.shape, strides, dtype, gpu_data=memory)


def host_index_array(name: str, array: Any) -> np.ndarray:
    """A CPU tensor's memory as a NumPy array (no copy where the producer allows): an index argument.

    What the CUDA simulator does with a CPU torch tensor passed as an index argument (e.g.
    ``accept_lengths = torch.tensor([...], dtype=torch.int32)``): the simulator's device memory
    is host memory, so the tensor is taken as the NumPy array of its memory and staged like one.
    DLPack first (``__dlpack_device__`` must say ``kDLCPU``), else ``__array__``. The caller
    checks the dtype, shape and contiguity, as for any NumPy array. On a real GPU the backend
    does not call this: a CPU torch tensor for a device argument stays refused there.

    Args:
        name: the argument, for the error message.
        array: the tensor (anything exporting host DLPack or ``__array__``).

    Raises:
        TypeError: the tensor is not in host memory, or exports neither DLPack nor ``__array__``.
    """
    if hasattr(array, "__dlpack__") and hasattr(array, "__dlpack_device__"):
        device_type = int(array.__dlpack_device__()[0])
        if device_type != KDL_CPU:
            raise TypeError(f"{name} must be a host or GPU tensor, got a DLPack tensor on device type {device_type}")
        try:
            return np.from_dlpack(array)
        except (BufferError, RuntimeError, TypeError) as error:
            raise TypeError(f"{name}: could not import it through DLPack ({error})") from None
    if hasattr(array, "__array__"):
        return np.asarray(array)
    raise TypeError(f"{name} must export DLPack (host memory) or __array__, got {type(array).__name__}")


class _CUDAArrayInterface:
    """An imported DLPack tensor as a ``__cuda_array_interface__`` (what a dispatcher launch takes)."""

    __slots__ = ("__cuda_array_interface__", "keeper")

    def __init__(self, view: Any) -> None:
        dtype = np.dtype(np.uint16) if view.dtype.name == "bfloat16" else view.dtype
        self.keeper = view.keeper
        self.__cuda_array_interface__ = {
            "version": 3,
            "shape": view.shape,
            "typestr": dtype.str,
            "data": (view.pointer, False),
            "strides": view.strides,
        }


def index_array(view: Any, simulator: bool) -> Any:
    """An imported DLPack index tensor as a kernel argument, built cheaply (see `numba_array`).

    On the GPU a prepared launch needs only the pointer; this object is what a dispatcher launch
    (the fallback) passes, and it holds the producer's tensor for as long as it is referenced.
    """
    return numba_array(view, simulator) if simulator else _CUDAArrayInterface(view)
