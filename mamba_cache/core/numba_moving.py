"""The Numba backend's hooks for state parcels: device byte buffers, the run copy and the chunk checksums.

A mixin of [`NumbaMambaCacheManager`][mamba_cache.NumbaMambaCacheManager]; the logic and every check
are backend-neutral (``core/moving.py``, `mamba_cache.moving.parcel`), the kernels are in
``mamba_cache/moving/kernels.py``. Exports and imports are not graph-capturable (they allocate the
buffer and read the checksums back to the host).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ..moving import kernels as parcel_kernels
from ..moving.parcel import ParcelError
from .device import SIMULATOR, device_pointer

#: Bytes each block of the checksum kernel sums (a 1 MiB chunk is 16 blocks: every SM has work).
SPLIT_BYTES = 1 << 16


def _flat_bytes(pool: Any) -> Any:
    """A contiguous device pool seen as flat uint8."""
    return pool.reshape(math.prod(pool.shape)).view(np.uint8)


class NumbaParcelHooks:
    """``_parcel_buffer``, ``_parcel_buffer_in``, ``_copy_runs`` and ``_chunk_checksums`` on device arrays."""

    def _parcel_buffer(self, nbytes: int, stream: Any) -> Any:
        if SIMULATOR or not nbytes:
            return cuda.to_device(np.zeros(nbytes, dtype=np.uint8), stream=stream.stream)
        from numba.cuda.cudadrv import driver

        buffer = cuda.device_array(nbytes, dtype=np.uint8, stream=stream.stream)
        driver.device_memset(buffer, 0, nbytes, stream=stream.stream)  # padding and alignment gaps: zeros
        return buffer

    def _parcel_buffer_in(self, name: str, buffer: Any, nbytes: int, stream: Any) -> Any:
        if hasattr(buffer, "__cuda_array_interface__"):
            array = cuda.as_cuda_array(buffer)
        else:
            if hasattr(buffer, "__dlpack__") and not isinstance(buffer, np.ndarray):
                buffer = np.from_dlpack(buffer)  # a host torch tensor
            host = np.frombuffer(buffer, dtype=np.uint8) if isinstance(buffer, (bytes, bytearray)) else buffer
            if not isinstance(host, np.ndarray):
                raise TypeError(f"{name} must be a uint8 device array or host array, got {type(buffer).__name__}")
            array = host
        if np.dtype(array.dtype) != np.uint8 or len(array.shape) != 1:
            raise TypeError(f"{name} must be a 1-D uint8 array, got {np.dtype(array.dtype).name} {list(array.shape)}")
        if array.shape[0] != nbytes:
            raise ParcelError(f"{name} holds {array.shape[0]} bytes, its descriptor says {nbytes}; nothing was changed")
        if isinstance(array, np.ndarray):  # staged: one host-to-device copy of the buffer
            array = cuda.to_device(np.ascontiguousarray(array), stream=stream.stream)
        return array

    def _copy_runs(self, table: np.ndarray, buffer: Any, pools: tuple, to_buffer: bool, stream: Any) -> None:
        if not table.shape[0]:
            return
        longest = int(table[:, 3].max())
        pieces = max(1, min(64, -(-longest // (parcel_kernels.THREADS * 8 * 4))))
        runs = cuda.to_device(np.ascontiguousarray(table), stream=stream.stream)
        a, b = (_flat_bytes(pool) for pool in pools)
        views = [_words(array) for array in (buffer, a, b)]
        aligned = all(ok for _, ok in views)
        launch = parcel_kernels.copy_runs[(table.shape[0], pieces), parcel_kernels.THREADS, stream.stream]
        launch(buffer, views[0][0], a, views[1][0], b, views[2][0], runs, 1 if to_buffer else 0, int(aligned))

    def _chunk_checksums(
        self, buffer: Any, chunk_bytes: int, stream: Any, split_bytes: int = SPLIT_BYTES
    ) -> np.ndarray:
        nbytes = buffer.shape[0]
        chunks = -(-nbytes // chunk_bytes)
        if not chunks:
            return np.zeros(0, dtype=np.uint32)
        # splits of split_bytes when they tile the chunk; a chunk of another size is one split (still correct)
        split = split_bytes if chunk_bytes % split_bytes == 0 else chunk_bytes
        splits = min(chunk_bytes // split, -(-nbytes // split))  # a short buffer: only the splits it reaches
        partials = cuda.device_array((chunks, splits, 2), dtype=np.uint64, stream=stream.stream)
        out = cuda.device_array(chunks, dtype=np.uint32, stream=stream.stream)
        words, aligned = _words(buffer)
        threads = parcel_kernels.THREADS
        parcel_kernels.adler_partials[(chunks, splits), threads, stream.stream](
            buffer, words, chunk_bytes, split, partials, int(aligned)
        )
        parcel_kernels.adler_combine[-(-chunks // threads), threads, stream.stream](
            partials, nbytes, chunk_bytes, split, out
        )
        host = out.copy_to_host(stream=stream.stream)
        stream.stream.synchronize()
        return host


def _words(array: Any) -> tuple[Any, bool]:
    """``(the first len // 8 8-byte words of a flat uint8 device array, whether it is 8-byte aligned)``.

    A one-word placeholder (and False) when it holds no whole word or its address is not aligned.
    """
    count = array.shape[0] // 8
    if not count or device_pointer(array) % 8:
        return cuda.device_array(1, dtype=np.uint64), False
    return array[: count * 8].view(np.uint64), True
