"""CUDA kernels of the Numba backend.

Every kernel moves raw words (``uint64`` where a slot's byte count allows it, else ``uint32``,
``uint16``): a copy is then bit-exact for any state dtype, and the kernels compile once per word
type rather than once per state dtype. The pools they see are word views of the stacked
allocations described in :mod:`mamba_cache._manager`:

    dst   [L, B, W]        main pool, W words per slot
    src   [L, B*S, W]      intermediate pool; the verify pass wrote it as [active, V, W]
                           from the start of each layer, so (row b, step t) is src row b*V + t

Launch shape, shared by the slot kernels (``WORDS_PER_THREAD`` words per thread):

    grid  = (ceil(W / (threads * WORDS_PER_THREAD)), rows, L)   rows = active batch (<= 65535)
    block = (threads,)                                          threads = 32..256, see below

    blockIdx.z -> layer, blockIdx.y -> batch row, blockIdx.x -> a chunk of the slot:

    slot row (W words) |<- chunk 0 ---------------->|<- chunk 1 ...
                       | t0 t1 .. tT | t0 t1 .. tT |  (WORDS_PER_THREAD strides of `threads` words)

Why this shape: one block never straddles two slots, so the accept test is one load per block
and a skipped row costs only an early exit; consecutive threads touch consecutive 8-byte words
(coalesced 256-byte segments per warp); each thread issues ``WORDS_PER_THREAD`` independent loads
before its first store, which keeps enough bytes in flight to saturate HBM (benchmarks/NOTES.md
gives the measured effect of each choice). Indices are computed in 64-bit, so pools over 2**31
words are fine.
"""

from __future__ import annotations

from numba import cuda

#: Words each thread copies (its loads are all issued before the stores).
WORDS_PER_THREAD = 4
#: Largest block; smaller slots get the smallest multiple of 32 that covers them.
MAX_THREADS = 256


def launch_shape(words: int) -> tuple[int, int]:
    """Return ``(chunks, threads)`` covering ``words`` words of one slot.

    ``threads`` is the smallest multiple of 32 (at most :data:`MAX_THREADS`) such that one chunk
    of ``threads * WORDS_PER_THREAD`` words covers the slot, so tiny states do not launch idle
    warps; ``chunks`` is the number of such chunks per slot.
    """
    per_thread_words = -(-words // WORDS_PER_THREAD)
    threads = min(MAX_THREADS, max(32, -(-per_thread_words // 32) * 32))
    chunk = threads * WORDS_PER_THREAD
    return -(-words // chunk), threads


@cuda.jit(cache=False)
def scatter_accepted(dst, src, accept_lengths, seq_len):
    """Copy each row's last accepted intermediate state into its main-pool slot.

    For layer ``l = blockIdx.z``, row ``b = blockIdx.y`` and ``a = accept_lengths[b]``:
    if ``1 <= a < seq_len`` then ``dst[l, b, :] = src[l, b * seq_len + a - 1, :]``, else nothing.

    Args:
        dst: ``[L, B, W]`` words, the main pool (written).
        src: ``[L, B*S, W]`` words, the intermediate pool (read).
        accept_lengths: ``[rows]`` int32; any value is safe.
        seq_len: V, the current verify length (``1 <= V <= S``).

    Grid ``(chunks, rows, L)``, block ``(threads,)``; see the module docstring.
    """
    layer = cuda.blockIdx.z
    row = cuda.blockIdx.y
    accepted = accept_lengths[row]
    # Compare the int32 before subtracting: INT32_MIN - 1 must not wrap to a valid step.
    if accepted < 1 or accepted >= seq_len:
        return
    src_row = row * seq_len + (accepted - 1)
    _copy_chunk(dst, layer, row, src, layer, src_row)


@cuda.jit(cache=False)
def copy_slot(dst, src, slot):
    """Gather one slot of every layer: ``dst[l, 0, :] = src[l, slot, :]``.

    Args:
        dst: ``[L, 1, W]`` words (written).
        src: ``[L, B, W]`` words, the main pool (read).
        slot: the slot, ``0 <= slot < B``.

    Grid ``(chunks, 1, L)``, block ``(threads,)``.
    """
    layer = cuda.blockIdx.z
    _copy_chunk(dst, layer, 0, src, layer, slot)


@cuda.jit(cache=False)
def zero_words(dst):
    """Zero a flat word array: ``dst[:] = 0``.

    Args:
        dst: ``[n]`` words (written).

    Grid ``(ceil(n / (threads * WORDS_PER_THREAD)),)``, block ``(threads,)``; each thread stores
    ``WORDS_PER_THREAD`` words ``threads`` apart, so a warp writes whole 256-byte segments.
    """
    threads = cuda.blockDim.x
    base = cuda.blockIdx.x * threads * WORDS_PER_THREAD + cuda.threadIdx.x
    n = dst.shape[0]
    for i in range(WORDS_PER_THREAD):
        w = base + i * threads
        if w < n:
            dst[w] = 0


@cuda.jit(device=True, inline="always")
def _copy_chunk(dst, dst_layer, dst_row, src, src_layer, src_row):
    """Copy chunk ``blockIdx.x`` of one slot: all loads first, then all stores."""
    threads = cuda.blockDim.x
    base = cuda.blockIdx.x * threads * WORDS_PER_THREAD + cuda.threadIdx.x
    words = dst.shape[2]
    buf = cuda.local.array(WORDS_PER_THREAD, dst.dtype)
    for i in range(WORDS_PER_THREAD):
        w = base + i * threads
        if w < words:
            buf[i] = src[src_layer, src_row, w]
    for i in range(WORDS_PER_THREAD):
        w = base + i * threads
        if w < words:
            dst[dst_layer, dst_row, w] = buf[i]
