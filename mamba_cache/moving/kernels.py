"""The device kernels of a state parcel: byte runs between the pools and a buffer, and the chunk checksums.

Both work on bytes (every pool seen flat as uint8), so one kernel serves every dtype and layout; the
run table and the chunking come from `mamba_cache.moving.parcel`, whose NumPy twins define them.

```text
runs [R, 4] int64: (pool, pool byte, buffer byte, bytes)      one block row per run

pool 0 (recurrent, flat u8) --+                               +--> buffer (u8) [.. run r ..]
pool 1 (conv, flat u8) -------+-- block (x = r, y = piece) -->+    (or back, to_buffer = 0)
```
"""

from __future__ import annotations

import numpy as np
from numba import cuda, uint64

from ..core.device import SIMULATOR

#: Threads per block (one warp under the simulator, where every thread is Python).
THREADS = 32 if SIMULATOR else 256
#: Adler-32's modulus.
ADLER_MOD = 65521


@cuda.jit(cache=False)
def copy_runs(buffer, pool_a, pool_b, runs, to_buffer):
    """Copy every run between a pool and the buffer: ``buffer[dst:dst+n] = pool[src:src+n]`` (or back).

    Args:
        buffer (DeviceNDArray): ``[nbytes]`` uint8, the parcel buffer.
        pool_a (DeviceNDArray): the recurrent pool, flat uint8.
        pool_b (DeviceNDArray): the conv pool, flat uint8.
        runs (DeviceNDArray): ``[R, 4]`` int64 (pool, pool byte, buffer byte, bytes).
        to_buffer (int): 1 to copy pool -> buffer (export), 0 buffer -> pool (import).

    Grid ``(R, pieces)``, block ``(THREADS,)``: block ``(r, y)`` copies bytes ``y * THREADS + t``,
    stepping ``pieces * THREADS``, of run ``r``.
    """
    r = cuda.blockIdx.x
    pool = runs[r, 0]
    src = runs[r, 1]
    dst = runs[r, 2]
    n = runs[r, 3]
    step = cuda.gridDim.y * cuda.blockDim.x
    i = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    while i < n:
        if to_buffer:
            buffer[dst + i] = pool_a[src + i] if pool == 0 else pool_b[src + i]
        elif pool == 0:
            pool_a[src + i] = buffer[dst + i]
        else:
            pool_b[src + i] = buffer[dst + i]
        i += step


@cuda.jit(cache=False)
def adler_chunks(buffer, chunk_bytes, out):
    """Adler-32 of each chunk: ``out[c]`` for bytes ``[c * chunk_bytes, min(len, (c + 1) * chunk_bytes))``.

    ``A = 1 + sum(b_i)``, ``B = n + sum((n - i) * b_i)`` mod 65521 (``i`` from 0 within the chunk of
    ``n`` bytes), ``out = B << 16 | A``: zlib's Adler-32, as
    [`adler32_chunks`][mamba_cache.moving.parcel.adler32_chunks]. Each thread sums its strided bytes
    in uint64 (a 1 MiB chunk's weighted sum stays below 2**48), then a shared-memory tree adds them.

    Grid ``(chunks,)``, block ``(THREADS,)``.
    """
    sum_a = cuda.shared.array(THREADS, dtype=uint64)
    sum_b = cuda.shared.array(THREADS, dtype=uint64)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    start = c * chunk_bytes
    n = min(chunk_bytes, buffer.shape[0] - start)
    a = uint64(0)
    b = uint64(0)
    i = t
    while i < n:
        value = uint64(buffer[start + i])
        a += value
        b += value * uint64(n - i)
        i += THREADS
    sum_a[t] = a
    sum_b[t] = b
    cuda.syncthreads()
    width = THREADS // 2
    while width > 0:
        if t < width:
            sum_a[t] += sum_a[t + width]
            sum_b[t] += sum_b[t + width]
        cuda.syncthreads()
        width //= 2
    if t == 0:
        low = (uint64(1) + sum_a[0]) % uint64(ADLER_MOD)
        high = (uint64(n) + sum_b[0]) % uint64(ADLER_MOD)
        out[c] = np.uint32((high << uint64(16)) | low)
