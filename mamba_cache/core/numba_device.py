"""Which GPU and which stream: the Numba backend's device plumbing.

Resolving a ``device`` argument to a GPU and its primary context (`resolve_device`), running a
manager's methods with that context current (`on_device`, pushed only when another is), resolved
``stream`` arguments (`StreamRef`), stream-ordered allocation (`device_empty`), and the word views
a copy kernel sees a pool through (`slot_words`, `aligned_word`). ``core/numba_backend.py`` binds
them into the manager.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from .device import SIMULATOR, DeviceArray

__all__ = [
    "StreamRef",
    "aligned_word",
    "current_context_handle",
    "device_empty",
    "device_name",
    "on_device",
    "resolve_device",
    "slot_words",
    "stream_ref",
    "word_dtype",
]


class StreamRef(NamedTuple):
    """A resolved ``stream`` argument: the Numba stream, its raw handle, and the object given."""

    stream: Any
    handle: int
    owner: Any


def stream_ref(stream: Any) -> StreamRef:
    """The `StreamRef` of a Numba stream (handle 0 under the simulator)."""
    return StreamRef(stream, 0 if SIMULATOR else int(stream.handle), stream)


def word_dtype(nbytes: int) -> np.dtype:
    """The widest unsigned word (8, 4, 2 or 1 bytes) that divides ``nbytes``."""
    for size in (8, 4, 2, 1):
        if nbytes % size == 0:
            return np.dtype(f"u{size}")
    raise AssertionError("unreachable")


def slot_words(pool: Any, rows: int, widest: int = 8) -> Any:
    """View a stacked pool ``[L, ...]`` as ``[L, rows, W]`` words, W as wide as the slot allows.

    ``widest`` caps the word (a caller's buffer may start at any element: see `aligned_word`).
    """
    layers = pool.shape[0]
    slot_bytes = pool.size // (layers * rows) * pool.dtype.itemsize
    flat = pool.reshape(layers, rows, pool.size // (layers * rows))
    return flat.view(word_dtype(math.gcd(slot_bytes, widest)))


def aligned_word(array: Any, pointer: int) -> int:
    """The widest word (8, 4, 2 or 1 bytes) the start of ``array``'s memory is aligned to.

    ``pointer`` is ``device_pointer(array)``, which the caller needs anyway. The pools are
    allocated aligned, but a caller's output may be a view that starts at any element (a slice of
    a larger buffer): an 8-byte word access there faults on the GPU (misaligned address). Under
    the simulator (where ``pointer`` is 0) the address is the host array's.
    """
    address = int(array._ary.__array_interface__["data"][0]) if SIMULATOR else pointer
    return min(8, address & -address) if address else 8


def resolve_device(device: Any) -> tuple[Any, int | None]:
    """(numba ``cuda.gpus`` entry, its primary context's handle) for ``device``; ``(None, None)`` simulated."""
    if SIMULATOR:
        return None, None
    if device is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            ordinal = torch.cuda.current_device()
        else:
            ordinal = cuda.get_current_device().id
    else:
        index = getattr(device, "index", device)
        if getattr(device, "type", "cuda") != "cuda":
            raise TypeError(f"device must be a CUDA device, got {device!r}")
        if index is None:  # torch.device("cuda") means the current one
            return resolve_device(None)
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"device must be an int ordinal or a torch.device, got {device!r}")
        ordinal = int(index)
        if not 0 <= ordinal < len(cuda.gpus):
            raise ValueError(f"device must be in [0, {len(cuda.gpus)}) (the GPUs present), got {ordinal}")
    gpu = cuda.gpus[ordinal]
    with gpu:
        raw = cuda.current_context().handle  # a ctypes pointer or a cuda.bindings CUcontext
        handle = int(raw.value or 0) if hasattr(raw, "value") else int(raw)
    return gpu, handle


def current_context_handle() -> int:
    """The raw handle of the CUDA context current on this thread (0 when none), through ``cuCtxGetCurrent``."""
    global _cuCtxGetCurrent
    if _cuCtxGetCurrent is None:  # imported once: an import statement per call costs a microsecond
        from cuda.bindings import driver

        _cuCtxGetCurrent = driver.cuCtxGetCurrent
    err, context = _cuCtxGetCurrent()
    return int(context) if not err else 0


_cuCtxGetCurrent = None


def on_device(method: Any) -> Any:
    """Run ``method`` with the manager's device context current (pushed only when another one is)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        handle = self._context_handle
        if handle is None or current_context_handle() == handle:
            return method(self, *args, **kwargs)
        with self._gpu:
            return method(self, *args, **kwargs)

    return wrapper


def device_name() -> str:
    """The current CUDA device's name ("CUDA simulator" under the simulator)."""
    if SIMULATOR:
        return "CUDA simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else name


def device_empty(shape: tuple, dtype: np.dtype, stream: StreamRef) -> Any:
    """An uninitialised C-contiguous device array from CUDA's stream-ordered allocator.

    ``cuMemAllocAsync`` on ``stream`` costs a few microseconds and never synchronises, where a
    plain ``cuMemAlloc``/``cuMemFree`` pair (Numba's default) stalls the whole device on the free.
    The memory goes back with ``cuMemFreeAsync`` on the same stream once the array is
    garbage-collected (on the legacy default stream if that stream is gone). The array is not
    bound to a stream, so its ``__cuda_array_interface__`` names none.
    """
    if SIMULATOR:
        return cuda.device_array(shape, dtype=dtype)
    from cuda.bindings import driver
    from numba.cuda.cudadrv.driver import MemoryPointer

    nbytes = math.prod(shape) * dtype.itemsize
    err, pointer = driver.cuMemAllocAsync(nbytes, stream.handle)
    if err:
        raise MemoryError(f"cuMemAllocAsync of {nbytes} bytes failed: {err!r}")

    def free(pointer=pointer, handle=stream.handle):
        (err,) = driver.cuMemFreeAsync(pointer, handle)
        if err:
            driver.cuMemFreeAsync(pointer, 0)

    memory = MemoryPointer(cuda.current_context(), pointer, nbytes, finalizer=free)
    strides = tuple(int(np.prod(shape[i + 1 :])) * dtype.itemsize for i in range(len(shape)))
    return DeviceArray(shape, strides, dtype, gpu_data=memory)
