"""Device scratch of the chunked prefill: allocated once per chunk size and formats, grown on demand.

A chunked prefill (`mamba_cache.models.chunked_kernels`) needs working arrays whose leading dim is the
prompt's length ``T``, its chunk count or its checkpoint count, and a few small inputs on the device
(the token ids, the checkpoint positions and destinations, the rounding formats). Allocating them per
call puts ``cuMemAlloc`` calls (and the synchronous copies of ``cuda.to_device``) inside every prefill,
so the call could never be captured into a CUDA graph and costs a host sync each time. A `ChunkedScratch`
keeps one buffer per name, allocated at the first call that needs it (or a larger one) and handed
out as a view of exactly the rows a call needs; an input is copied (asynchronously, on the given
stream) only when it differs from the previous call's. So every call after the first of its size
allocates nothing, and one that repeats the previous call's inputs copies nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

__all__ = ["ChunkedScratch"]


class ChunkedScratch:
    """Named device buffers reused call after call (see the module's docstring).

    Args:
        stream: the Numba stream the inputs are copied on (the stream the prefill's kernels run on).
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._buffers: dict[str, Any] = {}
        self._inputs: dict[str, tuple] = {}  # name -> (the buffer it was copied into, a host copy)

    def array(self, name: str, rows: int, tail: tuple, dtype: Any) -> Any:
        """A ``[rows, *tail]`` view of buffer ``name`` (reallocated only when it is too small or reshaped).

        The contents are whatever the previous call left there: the kernels write before they read.
        """
        dtype = np.dtype(dtype)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1:] != tuple(tail) or buffer.dtype != dtype:
            buffer = self._buffers[name] = cuda.device_array((max(rows, 1), *tail), dtype=dtype)
        return buffer[:rows]

    def input(self, name: str, host: np.ndarray) -> Any:
        """``host`` on the device in buffer ``name``: copied only when it differs from the previous call's."""
        host = np.ascontiguousarray(host)
        view = self.array(name, host.shape[0], host.shape[1:], host.dtype)
        buffer = self._buffers[name]
        last = self._inputs.get(name)
        if last is None or last[0] is not buffer or last[1].shape != host.shape or not np.array_equal(last[1], host):
            view.copy_to_device(host, stream=self.stream)
            self._inputs[name] = (buffer, host.copy())
        return view

    @property
    def nbytes(self) -> int:
        """Device bytes the buffers hold."""
        return sum(b.size * b.dtype.itemsize for b in self._buffers.values())
