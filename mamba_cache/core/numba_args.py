"""The Numba backend's argument intake: index arrays and states from any producer, checked before a launch.

A mixin of [`NumbaMambaCacheManager`][mamba_cache.NumbaMambaCacheManager] (the ``_int32_array`` and
``_state_array`` hooks of ``core/backend.py``): int32 index arrays come as Numba device arrays, torch
or CuPy tensors (read directly: their ``__cuda_array_interface__`` costs microseconds), anything with
``__dlpack__`` (JAX, with the manager's stream as the consumer's) or ``__cuda_array_interface__``, or
host NumPy arrays (staged into a device buffer per argument name, ``_stage``); states for
``restore_slot`` and caller-provided capture outputs likewise. Each check names the argument and what
it must be, before anything is launched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from .checks import check_int32_array, is_c_contiguous
from .device import SIMULATOR, DeviceArray, device_pointer
from .launch import DeviceArg


class DeviceArguments:
    """``_int32_array`` / ``_state_array`` and their helpers, for the Numba backend."""

    def _int32_array(self, name: str, array: Any, layout: str, stream: Any) -> tuple[DeviceArg, tuple]:
        # A decode loop passes the same arrays call after call: once checked, an array is reused
        # while what could have changed about it has not. A Numba array cannot change its pointer,
        # shape or dtype; a CuPy array can change only its shape (in place); a torch tensor can
        # also be re-pointed (set_, resize_), so its pointer, shape and dtype are compared too.
        last = self._last_arrays.get(name)
        if last is not None and last[0] is array:
            kind = last[2]
            if kind is None:
                return last[1]
            if kind == "cupy":
                if array.shape == last[3]:
                    return last[1]
            elif (
                array.data_ptr() == last[1][0].pointer
                and array.shape == last[3]
                and array.dtype == last[4]
                and array.is_contiguous()
            ):
                return last[1]
        checked = self._check_int32_array(name, array, layout, stream)
        if not SIMULATOR:
            kind = type(array)
            if kind is DeviceArray:
                self._last_arrays[name] = (array, checked, None)
            elif kind.__module__.startswith("torch"):
                self._last_arrays[name] = (array, checked, "torch", array.shape, array.dtype)
            elif kind.__module__.startswith("cupy"):
                self._last_arrays[name] = (array, checked, "cupy", array.shape)
        return checked

    def _check_int32_array(self, name: str, array: Any, layout: str, stream: Any) -> tuple[DeviceArg, tuple]:
        module = type(array).__module__
        if module.startswith("torch"):  # read the tensor directly: its __cuda_array_interface__ costs microseconds
            if not array.is_cuda:
                if SIMULATOR:  # its device memory is host memory: the tensor's memory is staged as NumPy's is
                    from ..interop.arrays import host_index_array

                    return self._check_int32_array(name, host_index_array(name, array), layout, stream)
                raise TypeError(f"{name} must be on the GPU, got a torch tensor on {array.device}")
            dtype = str(array.dtype).removeprefix("torch.")
            if dtype != "int32":
                raise TypeError(f"{name} must have dtype int32, got {dtype}")
            shape = check_int32_array(name, np.int32, tuple(array.shape), array.is_contiguous(), layout)
            return (DeviceArg(array, array.data_ptr(), shape), shape)
        if module.startswith("cupy"):
            shape = check_int32_array(name, array.dtype, array.shape, array.flags.c_contiguous, layout)
            return (DeviceArg(array, int(array.data.ptr), shape), shape)
        if isinstance(array, np.ndarray):
            shape = check_int32_array(name, array.dtype, array.shape, array.flags.c_contiguous, layout)
            return (DeviceArg(*self._stage(name, array, stream), shape), shape)
        if SIMULATOR and isinstance(array, DeviceArray):
            shape = check_int32_array(name, array.dtype, array.shape, array.is_c_contiguous(), layout)
            return (DeviceArg(array, 0, shape), shape)
        if hasattr(array, "__dlpack__") and not isinstance(array, DeviceArray):
            # e.g. a JAX array. DLPack before __cuda_array_interface__ (JAX has both): its exchange
            # passes our stream to the producer, which orders its pending writes before our launch.
            return self._int32_from_dlpack(name, array, layout, stream)
        interface = getattr(array, "__cuda_array_interface__", None)
        if interface is None:
            raise TypeError(
                f"{name} must be a device array (numba, or any object with __cuda_array_interface__) "
                f"or a numpy.ndarray of int32, or any object with __dlpack__; got {type(array).__name__}"
            )
        shape = tuple(interface["shape"])
        contiguous = is_c_contiguous(shape, interface.get("strides"), np.dtype(interface["typestr"]).itemsize)
        shape = check_int32_array(name, interface["typestr"], shape, contiguous, layout)
        return (DeviceArg(array, int(interface["data"][0]), shape), shape)

    def _import_dlpack(self, name: str, array: Any, stream: int) -> Any:
        """Import ``array`` through DLPack: a ``DLPackView`` of GPU memory, or a NumPy array for host memory.

        Raises:
            TypeError: the producer refuses, the dtype is unsupported, or the tensor lives on
                another GPU or on a device that is neither the GPU nor the host.
        """
        from ..interop import dlpack

        try:
            device_type, device_id = (int(v) for v in array.__dlpack_device__())
            if device_type == dlpack.KDL_CPU:
                return np.from_dlpack(array)
            if device_type not in (dlpack.KDL_CUDA, dlpack.KDL_CUDA_MANAGED):
                raise TypeError(
                    f"{name} must be on the GPU, got a DLPack tensor on device type {device_type} "
                    f"(kDLCUDA = {dlpack.KDL_CUDA})"
                )
            if device_id != self.device_id:
                raise TypeError(
                    f"{name} must be on GPU {self.device_id} (the manager's), got a DLPack tensor on GPU {device_id}"
                )
            return dlpack.from_dlpack(array, stream=stream)
        except BufferError as error:
            raise TypeError(f"{name}: could not import it through DLPack ({error})") from None

    def _int32_from_dlpack(self, name: str, array: Any, layout: str, stream: Any) -> tuple[DeviceArg, tuple]:
        # The consumer stream: the producer orders its pending writes before our launch on it.
        view = self._import_dlpack(name, array, stream.handle or 1)  # 1: the legacy default stream
        if isinstance(view, np.ndarray):  # host memory: staged like any host array
            return self._check_int32_array(name, view, layout, stream)
        contiguous = is_c_contiguous(view.shape, view.strides, view.dtype.itemsize)
        shape = check_int32_array(name, view.dtype, view.shape, contiguous, layout)
        from ..interop.arrays import index_array

        return (DeviceArg(index_array(view, SIMULATOR), view.pointer, shape), shape)

    def _stage(self, name: str, host: np.ndarray, stream: Any) -> tuple[Any, int]:
        """Copy a host index array into this manager's device staging buffer for ``name``."""
        staging = self._staging.get(name)
        if staging is None or staging.size < max(host.size, 1):
            staging = self._staging[name] = cuda.device_array(
                max(host.size, self._config.max_batch_size), dtype=np.int32
            )
            for key in [k for k in self._staging if isinstance(k, tuple) and k[1] == name]:
                del self._staging[key]  # views of the buffer this one replaces
        if SIMULATOR:
            staged = staging[: host.size].reshape(host.shape) if host.size else staging
            if host.size:
                staged.copy_to_device(host, stream=stream.stream)
            return staged, device_pointer(staged)
        # The view (and its pointer) per shape is built once: DeviceNDArray slicing and
        # copy_to_device cost tens of microseconds of Python each; the raw driver copy a few. From
        # pageable memory the driver has read ``host`` when the call returns (safe to reuse).
        view = self._staging.get(("view", name, host.shape))
        if view is None:
            staged = staging[: host.size].reshape(host.shape) if host.size else staging
            view = self._staging[("view", name, host.shape)] = (staged, device_pointer(staged))
        if host.size:
            from cuda.bindings import driver

            (err,) = driver.cuMemcpyHtoDAsync(view[1], host.ctypes.data, host.nbytes, stream.handle)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuMemcpyHtoDAsync of {name} failed: {err!r}")
        return view

    def _state_array(self, name: str, array: Any, shape: tuple, dtype: np.dtype) -> Any:
        if isinstance(array, np.ndarray):
            raise TypeError(f"{name} must be a device array for the Numba backend, got a host numpy.ndarray")
        if not isinstance(array, DeviceArray) and hasattr(array, "__dlpack__"):
            array = self._state_from_dlpack(name, array, dtype)
        if not isinstance(array, DeviceArray):
            if SIMULATOR or not hasattr(array, "__cuda_array_interface__"):
                raise TypeError(f"{name} must be a device array for the Numba backend, got {type(array).__name__}")
            array = cuda.as_cuda_array(array, sync=False)
        if array.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype.name} (the pool's), got {array.dtype.name}")
        if tuple(array.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(array.shape)}")
        if not array.is_c_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return array

    def _state_from_dlpack(self, name: str, array: Any, dtype: np.dtype) -> Any:
        # DLPack before __cuda_array_interface__: it carries the device and bfloat16, which CAI cannot.
        # No consumer stream (-1): as with CAI, the caller orders its work through stream=.
        view = self._import_dlpack(name, array, -1)
        if isinstance(view, np.ndarray):
            raise TypeError(f"{name} must be a device array for the Numba backend, got a host DLPack tensor")
        if view.dtype.name == "bfloat16" and dtype != np.uint16:  # bfloat16 pools are uint16 raw bits
            raise TypeError(f"{name} must have dtype {dtype.name} (the pool's), got bfloat16")
        if not is_c_contiguous(view.shape, view.strides, view.dtype.itemsize):
            raise ValueError(f"{name} must be contiguous")
        from ..interop.arrays import numba_array

        return numba_array(view, SIMULATOR)
