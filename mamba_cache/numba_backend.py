"""The Numba CUDA backend: the reference semantics on device arrays and CUDA streams.

It binds :class:`mamba_cache._manager.MambaCacheManagerBase` to ``numba.cuda`` device arrays.
Each state kind is one device allocation holding all layers; the layer tensors are
``DeviceNDArray`` views of it and expose ``__cuda_array_interface__``, so PyTorch
(``torch.as_tensor(view, device="cuda")``) and CuPy (``cupy.asarray(view)``) use them zero-copy.

The kernels are in :mod:`mamba_cache.kernels`. ``clear_states`` and ``scatter_mtp_states`` launch
prepared kernels (:mod:`mamba_cache._launch`): one launch per state kind covering every layer, no
allocation, no host synchronisation, so both can be captured into a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda
from numba.cuda.core import config as numba_config

from . import kernels
from ._config import Config, ConfigError, format_bytes
from ._launch import DispatcherLaunch, PreparedLaunch
from ._manager import MambaCacheManagerBase, check_accept_lengths

__all__ = ["NumbaMambaCacheManager"]

#: True when Numba runs kernels in its CPU simulator (``NUMBA_ENABLE_CUDASIM=1``).
SIMULATOR = bool(numba_config.ENABLE_CUDASIM)

#: CUDA limits the y and z grid dimensions (batch rows, layers) to 65535.
MAX_GRID_YZ = 65535

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DeviceArray

    _Launch = DispatcherLaunch
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DeviceArray

    _Launch = PreparedLaunch

_ACCEPT_ARG, _SEQ_LEN_ARG = 2, 3  # positions in kernels.scatter_accepted(dst, src, accept_lengths, seq_len)
_CAPTURE_DST_ARG, _CAPTURE_SLOT_ARG = 0, 2  # positions in kernels.copy_slot(dst, src, slot)


def _word_dtype(nbytes: int) -> np.dtype:
    """The widest unsigned word (8, 4, 2 or 1 bytes) that divides ``nbytes``."""
    for size in (8, 4, 2, 1):
        if nbytes % size == 0:
            return np.dtype(f"u{size}")
    raise AssertionError("unreachable")


def _slot_words(pool: Any, rows: int) -> Any:
    """View a stacked pool ``[L, ...]`` as ``[L, rows, W]`` words, W as wide as the slot allows."""
    layers = pool.shape[0]
    slot_bytes = pool.size // (layers * rows) * pool.dtype.itemsize
    flat = pool.reshape(layers, rows, pool.size // (layers * rows))
    return flat.view(_word_dtype(slot_bytes))


class NumbaMambaCacheManager(MambaCacheManagerBase):
    """Per-layer Mamba (recurrent + conv) state manager on a CUDA device, through Numba.

    Same interface, semantics and results (bit for bit) as :class:`NumpyMambaCacheManager`; the
    state tensors are ``numba.cuda`` device arrays (views of one allocation per state kind).

    Streams: every ``stream`` argument takes ``None`` (Numba's default stream), a
    ``numba.cuda`` stream, a raw ``CUstream`` handle as an int, or any object with
    ``__cuda_stream__`` (cuda.core, recent PyTorch) or a ``cuda_stream`` attribute
    (``torch.cuda.Stream``). Work is queued on it asynchronously; synchronise the stream before
    reading results on the host.

    Args:
        config: the cache configuration; ``None`` builds an empty manager.
        stream: the stream on which the buffers are zeroed.

    Raises:
        TypeError: ``config`` is not a :class:`mamba_cache.Config`, or ``stream`` is of an
            unknown kind.
        ConfigError: ``max_batch_size`` or ``num_recurrent_layers`` exceeds 65535 (a CUDA grid
            dimension).
        MemoryError: the device has too little free memory; nothing stays allocated.
    """

    backend = "numba"

    def __init__(self, config: Config | None = None, stream: Any = None) -> None:
        self._streams: dict[int, Any] = {}
        super().__init__(config, stream)

    def _become_empty(self) -> None:
        super()._become_empty()
        self._launches: dict = {}
        self._staging = None

    def _check_config(self, config: Config) -> None:
        for name in ("num_recurrent_layers", "max_batch_size"):
            value = getattr(config, name)
            if value > MAX_GRID_YZ:
                raise ConfigError(f"{name} must be <= {MAX_GRID_YZ} for the Numba backend, got {value}")

    # ------------------------------------------------------------ streams
    def _stream(self, stream: Any) -> Any:
        if stream is None:
            return cuda.default_stream()
        if SIMULATOR or hasattr(stream, "auto_synchronize"):  # a numba.cuda stream
            return stream
        if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
            handle = int(stream)
        elif hasattr(stream, "__cuda_stream__"):
            handle = int(stream.__cuda_stream__()[1])
        elif hasattr(stream, "cuda_stream"):
            handle = int(stream.cuda_stream)
        else:
            raise TypeError(
                "stream must be None, a numba.cuda stream, an int CUstream handle or an object with "
                f"__cuda_stream__ / cuda_stream, got {type(stream).__name__}"
            )
        wrapped = self._streams.get(handle)
        if wrapped is None:
            wrapped = cuda.default_stream() if handle == 0 else cuda.external_stream(handle)
            self._streams[handle] = wrapped
        return wrapped

    # ------------------------------------------------------------ hooks
    def _zeros(self, shape: tuple, dtype: np.dtype, stream: Any) -> Any:
        nbytes = math.prod(shape) * dtype.itemsize
        try:
            array = cuda.device_array(shape, dtype=dtype, stream=stream)
        except Exception as exc:  # numba raises CudaAPIError / its own OOM errors
            if "OUT_OF_MEMORY" not in repr(exc) and "out of memory" not in str(exc).lower():
                raise
            free, total = cuda.current_context().get_memory_info()
            raise MemoryError(
                f"could not allocate {format_bytes(nbytes)} ({nbytes} bytes) of device memory for a "
                f"{list(shape)} {dtype.name} pool; {format_bytes(free)} of {format_bytes(total)} free"
            ) from exc
        self._zero_fill(array, stream)
        return array

    def _zero_launch(self, pool: Any) -> tuple:
        """(prepared launch, grid) zeroing the whole of ``pool`` as flat words."""
        key = ("zero", id(pool))
        entry = self._launches.get(key)
        if entry is None:
            words = pool.reshape(pool.size).view(_word_dtype(pool.nbytes))
            blocks, threads = kernels.launch_shape(words.shape[0])
            entry = (_Launch(kernels.zero_words, (words,), threads), (blocks, 1, 1))
            self._launches[key] = entry
        return entry

    def _zero_fill(self, pool: Any, stream: Any) -> None:
        launch, grid = self._zero_launch(pool)
        launch.launch(grid, stream)

    def _capture(self, pool: Any, slot: int, stream: Any) -> Any:
        layers = pool.shape[0]
        out = cuda.device_array((layers, 1, *pool.shape[2:]), dtype=pool.dtype, stream=stream)
        key = ("capture", id(pool))
        entry = self._launches.get(key)
        if entry is None:
            src, dst = _slot_words(pool, pool.shape[1]), _slot_words(out, 1)
            chunks, threads = kernels.launch_shape(dst.shape[2])
            entry = (_Launch(kernels.copy_slot, (dst, src, 0), threads), (chunks, 1, layers))
            self._launches[key] = entry
        launch, grid = entry
        launch.set_array(_CAPTURE_DST_ARG, _slot_words(out, 1) if SIMULATOR else None, _device_pointer(out))
        launch.set_scalar(_CAPTURE_SLOT_ARG, slot)
        launch.launch(grid, stream)
        return out

    def _as_accept_lengths(self, accept_lengths: Any, stream: Any) -> tuple[Any, int]:
        slots = self._config.max_batch_size
        if isinstance(accept_lengths, np.ndarray):
            contiguous = accept_lengths.ndim != 1 or accept_lengths.shape[0] <= 1 or accept_lengths.strides[0] == 4
            active = check_accept_lengths(accept_lengths.dtype, accept_lengths.shape, contiguous, slots)
            if self._staging is None:
                self._staging = cuda.device_array(slots, dtype=np.int32, stream=stream)
            staged = self._staging[:active] if active else self._staging
            if active:
                staged.copy_to_device(accept_lengths, stream=stream)
            return (staged, _device_pointer(staged)), active
        if isinstance(accept_lengths, _DeviceArray) and SIMULATOR:
            active = check_accept_lengths(accept_lengths.dtype, accept_lengths.shape, True, slots)
            return (accept_lengths, 0), active
        interface = getattr(accept_lengths, "__cuda_array_interface__", None)
        if interface is None:
            raise TypeError(
                "accept_lengths must be a device array (numba, or any object with "
                f"__cuda_array_interface__) or a numpy.ndarray of int32, got {type(accept_lengths).__name__}"
            )
        shape = tuple(interface["shape"])
        strides = interface.get("strides")
        contiguous = strides is None or len(shape) != 1 or shape[0] <= 1 or tuple(strides) == (4,)
        active = check_accept_lengths(interface["typestr"], shape, contiguous, slots)
        return (accept_lengths, int(interface["data"][0])), active

    def _scatter_launch(self, kind: str) -> tuple:
        """(prepared launch, chunks per slot, layers) of the scatter of one state kind."""
        key = ("scatter", kind)
        entry = self._launches.get(key)
        if entry is None:
            pools, config = self._pools, self._config
            slots = config.max_batch_size
            dst = _slot_words(getattr(pools, kind), slots)
            src = _slot_words(getattr(pools, f"intermediate_{kind}"), slots * config.max_intermediate_seq_len)
            if self._staging is None:
                self._staging = cuda.device_array(slots, dtype=np.int32)
            chunks, threads = kernels.launch_shape(dst.shape[2])
            launch = _Launch(kernels.scatter_accepted, (dst, src, self._staging, 1), threads)
            entry = (launch, chunks, dst.shape[0])
            self._launches[key] = entry
        return entry

    def _scatter(self, accept_lengths: Any, active: int, seq_len: int, stream: Any) -> None:
        array, pointer = accept_lengths
        for kind in ("recurrent", "conv"):
            launch, chunks, layers = self._scatter_launch(kind)
            launch.set_array(_ACCEPT_ARG, array, pointer, active)
            launch.set_scalar(_SEQ_LEN_ARG, seq_len)
            launch.launch((chunks, active, layers), stream)


def _device_pointer(array: Any) -> int:
    return 0 if SIMULATOR else int(array.device_ctypes_pointer.value or 0)
