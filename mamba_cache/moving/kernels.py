"""The device kernels of a state parcel: byte runs between the pools and a buffer, and the chunk checksums.

Every pool is seen flat as uint8 (and as uint64 words where 8-byte aligned), so one kernel serves
every dtype and layout; the run table and the chunking come from `mamba_cache.moving.parcel`,
whose NumPy twins define them. The checksum of a 1 MiB chunk is summed by 16 blocks of 64 KiB
(`adler_partials`) and combined per chunk (`adler_combine`), so a large parcel keeps every SM busy.

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
def copy_runs(buffer, buffer_words, pool_a, words_a, pool_b, words_b, runs, to_buffer, use_words):
    """Copy every run between a pool and the buffer: ``buffer[dst:dst+n] = pool[src:src+n]`` (or back).

    With ``use_words`` (every array 8-byte aligned), a run whose two offsets are multiples of 8 moves
    in 8-byte words (its last ``n % 8`` bytes one by one); any other run moves byte by byte.

    Args:
        buffer (DeviceNDArray): ``[nbytes]`` uint8, the parcel buffer.
        buffer_words (DeviceNDArray): the same memory as uint64, ``[nbytes // 8]``.
        pool_a (DeviceNDArray): the recurrent pool, flat uint8.
        words_a (DeviceNDArray): the same memory as uint64.
        pool_b (DeviceNDArray): the conv pool, flat uint8.
        words_b (DeviceNDArray): the same memory as uint64.
        runs (DeviceNDArray): ``[R, 4]`` int64 (pool, pool byte, buffer byte, bytes).
        to_buffer (int): 1 to copy pool -> buffer (export), 0 buffer -> pool (import).
        use_words (int): 1 when the word views may be used.

    Grid ``(R, pieces)``, block ``(THREADS,)``: block ``(r, y)`` copies words (or bytes)
    ``y * THREADS + t``, stepping ``pieces * THREADS``, of run ``r``.
    """
    r = cuda.blockIdx.x
    pool = runs[r, 0]
    src = runs[r, 1]
    dst = runs[r, 2]
    n = runs[r, 3]
    step = cuda.gridDim.y * cuda.blockDim.x
    first = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    done = 0
    if use_words and src % 8 == 0 and dst % 8 == 0:
        words = n // 8
        s8 = src // 8
        d8 = dst // 8
        i = first
        while i < words:
            if to_buffer:
                buffer_words[d8 + i] = words_a[s8 + i] if pool == 0 else words_b[s8 + i]
            elif pool == 0:
                words_a[s8 + i] = buffer_words[d8 + i]
            else:
                words_b[s8 + i] = buffer_words[d8 + i]
            i += step
        done = words * 8
    i = done + first
    while i < n:
        if to_buffer:
            buffer[dst + i] = pool_a[src + i] if pool == 0 else pool_b[src + i]
        elif pool == 0:
            pool_a[src + i] = buffer[dst + i]
        else:
            pool_b[src + i] = buffer[dst + i]
        i += step


@cuda.jit(cache=False)
def adler_partials(buffer, words, chunk_bytes, split_bytes, partials, use_words):
    """Per (chunk, split) partial Adler sums: ``partials[c, s] = (sum b_i, sum (m - i) * b_i)``.

    Split ``s`` of chunk ``c`` is bytes ``[c * chunk_bytes + s * split_bytes, ...)`` of ``m`` bytes
    (``split_bytes`` or fewer at the chunk's or buffer's end), ``i`` counted from the split's start.
    With ``use_words`` (the buffer 8-byte aligned) and a split starting on a multiple of 8, threads
    read 8-byte words, then the split's last ``m % 8`` bytes one by one; otherwise bytes throughout.
    A shared-memory tree adds the block's sums. `adler_combine` turns the partials into each chunk's Adler-32.

    Grid ``(chunks, splits per chunk)``, block ``(THREADS,)``.
    """
    sum_a = cuda.shared.array(THREADS, dtype=uint64)
    sum_b = cuda.shared.array(THREADS, dtype=uint64)
    c = cuda.blockIdx.x
    sp = cuda.blockIdx.y
    t = cuda.threadIdx.x
    chunk_end = min((c + 1) * chunk_bytes, buffer.shape[0])
    start = c * chunk_bytes + sp * split_bytes
    m = max(0, min(split_bytes, chunk_end - start))
    a = uint64(0)
    b = uint64(0)
    word_count = m // 8 if use_words and start % 8 == 0 else 0
    j = t
    while j < word_count:
        word = words[start // 8 + j]
        for k in range(8):
            value = (word >> uint64(8 * k)) & uint64(0xFF)
            a += value
            b += value * uint64(m - (8 * j + k))
        j += THREADS
    i = word_count * 8 + t
    while i < m:
        value = uint64(buffer[start + i])
        a += value
        b += value * uint64(m - i)
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
        partials[c, sp, 0] = sum_a[0]
        partials[c, sp, 1] = sum_b[0]


@cuda.jit(cache=False)
def adler_combine(partials, nbytes, chunk_bytes, split_bytes, out):
    """Each chunk's Adler-32 from its splits' partial sums (one thread per chunk).

    For a chunk of ``n`` bytes, split ``s`` ending at byte ``e_s`` of the chunk contributes
    ``a_s`` to ``A`` and ``w_s + (n - e_s) * a_s`` to ``B`` (a byte's weight ``n - i`` is its weight
    in its split plus the bytes after the split); ``A = 1 + sum``, ``B = n + sum``, both mod 65521,
    ``out = B << 16 | A``, as [`adler32_chunks`][mamba_cache.moving.parcel.adler32_chunks].

    Grid ``(ceil(chunks / THREADS),)``, block ``(THREADS,)``.
    """
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if c >= partials.shape[0]:
        return
    n = min(chunk_bytes, nbytes - c * chunk_bytes)
    low = uint64(1)
    high = uint64(n)
    for sp in range(partials.shape[1]):
        end = min((sp + 1) * split_bytes, n)
        if sp * split_bytes < n:
            low += partials[c, sp, 0]
            high += partials[c, sp, 1] + uint64(n - end) * partials[c, sp, 0]
    out[c] = np.uint32(((high % uint64(ADLER_MOD)) << uint64(16)) | (low % uint64(ADLER_MOD)))
