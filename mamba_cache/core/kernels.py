"""CUDA kernels of the Numba backend.

Every kernel moves raw words (``uint64`` where a slot's byte count allows it, else ``uint32``,
``uint16``): a copy is then bit-exact for any state dtype, and the kernels compile once per word
type rather than once per state dtype. The pools they see are word views of the stacked
allocations described in ``mamba_cache.core.manager``:

    dst   [L, B, W]        main pool, W words per slot
    src   [L, B*S, W]      intermediate pool; the verify pass wrote it as [active, V, W]
                           from the start of each layer, so (row b, step t) is src row b*V + t

Launch shape, shared by the slot kernels (``WORDS_PER_THREAD`` words per thread):

    grid  = (sum over kinds of ceil(W / (threads * WORDS_PER_THREAD)), rows, L)
    block = (threads,)           rows = active batch (<= 65535), threads = 32..256, see below

    blockIdx.z -> layer, blockIdx.y -> batch row, blockIdx.x -> a chunk of the slot:

    slot row (W words) |<- chunk 0 ---------------->|<- chunk 1 ...
                       | t0 t1 .. tT | t0 t1 .. tT |  (WORDS_PER_THREAD strides of `threads` words)

The scatter and the clear each cover BOTH state kinds in one launch (the x blocks of the
recurrent slot first, then those of the conv slot): the C++ launches once per kind, but a launch
costs several microseconds of host time and the two kinds share every index but the pool.

Why this shape: one block never straddles two slots, so the accept test is one load per block
and a skipped row costs only an early exit; consecutive threads touch consecutive 8-byte words
(coalesced 256-byte segments per warp); each thread issues ``WORDS_PER_THREAD`` independent loads
before its first store, which keeps enough bytes in flight to saturate HBM (benchmarks/NOTES.md
gives the measured effect of each choice). Indices are computed in 64-bit, so pools over 2**31
words are fine.
"""

from __future__ import annotations

from numba import cuda

from .launch import MAX_THREADS as MAX_THREADS  # the largest block (the tests read it here)
from .launch import slot_launch_shape
from .rows import accepted_steps, is_padding, last_tree_node, row_slot, tracked_step

#: Words each thread copies (its loads are all issued before the stores).
WORDS_PER_THREAD = 4


def launch_shape(*words: int) -> tuple[tuple[int, ...], int]:
    """Return ``((chunks, ...), threads)`` covering slots of ``words`` words each, in one launch.

    `WORDS_PER_THREAD` words per thread and chunk, by the rule of `mamba_cache.core.launch.slot_launch_shape`.
    """
    return slot_launch_shape(words, [WORDS_PER_THREAD] * len(words))


@cuda.jit(cache=False)
def scatter_accepted(
    dst_a, src_a, dst_b, src_b, chunks_a, accept_lengths, state_indices, use_indices, seq_len, max_accept
):
    """Copy each row's last accepted intermediate state into its main-pool slot, both state kinds.

    For layer ``l = blockIdx.z``, row ``b = blockIdx.y``, ``a = accept_lengths[b]`` and slot
    ``s = state_indices[b]`` if ``use_indices`` else ``b``: if ``1 <= a <= max_accept`` and
    ``0 <= s < B`` then ``dst[l, s, :] = src[l, b * seq_len + a - 1, :]`` for both state kinds, else
    nothing. ``max_accept`` is ``V - 1`` when the verify pass wrote the final state into the main
    pool, ``V`` when it did not. The x blocks ``[0, chunks_a)`` copy kind a (the recurrent state),
    the rest kind b (the conv state), so one launch commits both:

    ```text
    blockIdx.x:  0 .. chunks_a-1 | chunks_a .. chunks_a+chunks_b-1
                 recurrent slot  | conv slot
    ```

    Args:
        dst_a (DeviceNDArray): ``[L, B, W]`` words, the recurrent pool (written).
        src_a (DeviceNDArray): ``[L, B*S, W]`` words, the intermediate recurrent pool (read).
        dst_b (DeviceNDArray): ``[L, B, W']`` words, the conv pool (written).
        src_b (DeviceNDArray): ``[L, B*S, W']`` words, the intermediate conv pool (read).
        chunks_a (int): x blocks that cover one slot of kind a.
        accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
        state_indices (DeviceNDArray): ``[rows]`` int32 slots (read only if ``use_indices``); any
            value is safe.
        use_indices (int): 1 to read ``state_indices``, 0 for slot = row.
        seq_len (int): V, the current verify length (``1 <= V <= S``).
        max_accept (int): ``V - 1`` or ``V``.

    Grid ``(chunks_a + chunks_b, rows, L)``, block ``(threads,)``; see the module docstring.
    """
    row = cuda.blockIdx.y
    accepted = accepted_steps(accept_lengths, row, max_accept)
    if accepted == 0:
        return
    _commit_chunk(dst_a, src_a, dst_b, src_b, chunks_a, state_indices, use_indices, row, row * seq_len + (accepted - 1))


@cuda.jit(cache=False)
def scatter_tree(dst_a, src_a, dst_b, src_b, chunks_a, node_ids, accept_lengths, state_indices, use_indices, seq_len):
    """Copy each row's last accepted tree node's state into its main-pool slot, both state kinds.

    For row ``b = blockIdx.y``: ``n = min(accept_lengths[b], M)``; ``node`` is the last
    non-negative entry of ``node_ids[b, :n]``; if there is one, ``node < seq_len`` and the slot is
    in ``[0, B)``: ``dst[l, slot, :] = src[l, b * seq_len + node, :]``. Every block of the row
    scans the row's ``M`` ids itself (M is a handful), so no block waits on another.

    Args:
        dst_a (DeviceNDArray): ``[L, B, W]`` words, the recurrent pool (written).
        src_a (DeviceNDArray): ``[L, B*S, W]`` words, the intermediate recurrent pool (read).
        dst_b (DeviceNDArray): ``[L, B, W']`` words, the conv pool (written).
        src_b (DeviceNDArray): ``[L, B*S, W']`` words, the intermediate conv pool (read).
        chunks_a (int): x blocks that cover one slot of kind a.
        node_ids (DeviceNDArray): ``[rows, M]`` int32 accepted node ids; any value is safe.
        accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
        state_indices (DeviceNDArray): ``[rows]`` int32 slots (read only if ``use_indices``).
        use_indices (int): 1 to read ``state_indices``, 0 for slot = row.
        seq_len (int): V, the number of tree nodes the verify pass wrote per row.

    Grid ``(chunks_a + chunks_b, rows, L)``, block ``(threads,)``.
    """
    row = cuda.blockIdx.y
    node, _ = last_tree_node(node_ids, accept_lengths, row, seq_len)
    if node < 0:
        return
    _commit_chunk(dst_a, src_a, dst_b, src_b, chunks_a, state_indices, use_indices, row, row * seq_len + node)


@cuda.jit(cache=False)
def copy_slot(dst, src, slot):
    """Gather one slot of every layer: ``dst[l, 0, :] = src[l, slot, :]``.

    Args:
        dst (DeviceNDArray): ``[L, 1, W]`` words (written).
        src (DeviceNDArray): ``[L, B, W]`` words, the main pool (read).
        slot (int): the slot, ``0 <= slot < B``.

    Grid ``(chunks, 1, L)``, block ``(threads,)``.
    """
    layer = cuda.blockIdx.z
    _copy_chunk(dst, layer, 0, src, layer, slot, cuda.blockIdx.x)


@cuda.jit(cache=False)
def zero_words(dst_a, dst_b, blocks_a):
    """Zero two flat word arrays in one launch: ``dst_a[:] = 0; dst_b[:] = 0``.

    Blocks ``[0, blocks_a)`` zero ``dst_a``, the rest ``dst_b``.

    Args:
        dst_a (DeviceNDArray): ``[n]`` words (written).
        dst_b (DeviceNDArray): ``[n']`` words (written).
        blocks_a (int): blocks that cover ``dst_a``.

    Grid ``(blocks_a + blocks_b,)``, block ``(threads,)``; each thread stores
    ``WORDS_PER_THREAD`` words ``threads`` apart, so a warp writes whole 256-byte segments.
    """
    block = cuda.blockIdx.x
    if block < blocks_a:
        _zero_chunk(dst_a, block)
    else:
        _zero_chunk(dst_b, block - blocks_a)


@cuda.jit(device=True, inline="always")
def _zero_chunk(dst, chunk):
    threads = cuda.blockDim.x
    base = chunk * threads * WORDS_PER_THREAD + cuda.threadIdx.x
    n = dst.shape[0]
    for i in range(WORDS_PER_THREAD):
        w = base + i * threads
        if w < n:
            dst[w] = 0


@cuda.jit(device=True, inline="always")
def _commit_chunk(dst_a, src_a, dst_b, src_b, chunks_a, state_indices, use_indices, row, src_row):
    """Copy this block's chunk of intermediate row ``src_row`` into the row's slot, if in range."""
    slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
    if slot < 0:
        return
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    if chunk < chunks_a:
        _copy_chunk(dst_a, layer, slot, src_a, layer, src_row, chunk)
    else:
        _copy_chunk(dst_b, layer, slot, src_b, layer, src_row, chunk - chunks_a)


@cuda.jit(cache=False)
def zero_slot(dst_a, dst_b, chunks_a, slot):
    """Zero one slot of every layer of two pools: ``dst_a[l, slot, :] = 0; dst_b[l, slot, :] = 0``.

    Args:
        dst_a (DeviceNDArray): ``[L, B, W]`` words (written).
        dst_b (DeviceNDArray): ``[L, B, W']`` words (written).
        chunks_a (int): x blocks that cover one slot of ``dst_a``.
        slot (int): the slot, ``0 <= slot < B``.

    Grid ``(chunks_a + chunks_b, 1, L)``, block ``(threads,)``.
    """
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    if chunk < chunks_a:
        _zero_row(dst_a, layer, slot, chunk)
    else:
        _zero_row(dst_b, layer, slot, chunk - chunks_a)


@cuda.jit(device=True, inline="always")
def _zero_row(dst, layer, row, chunk):
    threads = cuda.blockDim.x
    base = chunk * threads * WORDS_PER_THREAD + cuda.threadIdx.x
    words = dst.shape[2]
    for i in range(WORDS_PER_THREAD):
        w = base + i * threads
        if w < words:
            dst[layer, row, w] = 0


@cuda.jit(device=True, inline="always")
def _copy_chunk(dst, dst_layer, dst_row, src, src_layer, src_row, chunk):
    """Copy chunk ``chunk`` of one slot: all loads first, then all stores."""
    threads = cuda.blockDim.x
    base = chunk * threads * WORDS_PER_THREAD + cuda.threadIdx.x
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


@cuda.jit(device=True, inline="always")
def _row_pair(src_rows, dst_rows, use_rows, src_row, dst_row, src_count, dst_count):
    """``(s, d)`` of the block's pair (``blockIdx.y``), or ``(-1, -1)`` unless both are in range."""
    if use_rows:
        s = src_rows[cuda.blockIdx.y]
        d = dst_rows[cuda.blockIdx.y]
    else:
        s = src_row
        d = dst_row
    if s < 0 or s >= src_count or d < 0 or d >= dst_count:
        return -1, -1
    return s, d


@cuda.jit(cache=False)
def copy_rows(dst_a, src_a, dst_b, src_b, chunks_a, src_rows, dst_rows, use_rows, src_row, dst_row):
    """Copy rows between two stacked word pools, every layer and both state kinds in one launch.

    For layer ``l = blockIdx.z`` and pair ``i = blockIdx.y``: ``s = src_rows[i]``, ``d = dst_rows[i]``
    (the scalars ``src_row`` / ``dst_row`` when ``use_rows`` is 0, for a single pair without an
    index array); if ``0 <= s < R_src`` and ``0 <= d < R_dst`` then ``dst[l, d, :] = src[l, s, :]``
    for both kinds, else nothing. Serves slot-to-slot copies (src and dst the same pool: the
    caller keeps destinations distinct and disjoint from sources) and the prefix store's
    restore (store -> main pool) and insert (main pool -> store):

    ```text
    src [L, R_src, W] --row s--> dst [L, R_dst, W]     (and likewise [.., W'] for kind b)
    blockIdx.x:  0 .. chunks_a-1 | chunks_a .. chunks_a+chunks_b-1
                 recurrent row   | conv row
    ```

    Args:
        dst_a (DeviceNDArray): ``[L, R_dst, W]`` words, kind a (written).
        src_a (DeviceNDArray): ``[L, R_src, W]`` words, kind a (read).
        dst_b (DeviceNDArray): ``[L, R_dst, W']`` words, kind b (written).
        src_b (DeviceNDArray): ``[L, R_src, W']`` words, kind b (read).
        chunks_a (int): x blocks that cover one row of kind a.
        src_rows (DeviceNDArray): ``[n]`` int32 source rows (read only if ``use_rows``); any value is safe.
        dst_rows (DeviceNDArray): ``[n]`` int32 destination rows (read only if ``use_rows``).
        use_rows (int): 1 to read the index arrays, 0 to copy the single pair of scalars.
        src_row (int): the source row when ``use_rows`` is 0.
        dst_row (int): the destination row when ``use_rows`` is 0.

    Grid ``(chunks_a + chunks_b, n, L)``, block ``(threads,)``; see the module docstring.
    """
    s, d = _row_pair(src_rows, dst_rows, use_rows, src_row, dst_row, src_a.shape[1], dst_a.shape[1])
    if s < 0:
        return
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    if chunk < chunks_a:
        _copy_chunk(dst_a, layer, d, src_a, layer, s, chunk)
    else:
        _copy_chunk(dst_b, layer, d, src_b, layer, s, chunk - chunks_a)


#: The most pools `copy_rows_scaled` and `zero_slot_scaled` move in one launch: an 8-bit cache's two
#: state kinds, their two scale pools and the recurrent state's error-feedback residual.
SCALED_POOLS = 5


@cuda.jit(cache=False)
def copy_rows_scaled(
    d0, s0, d1, s1, d2, s2, d3, s3, d4, s4, end0, end1, end2, end3, src_rows, dst_rows, use_rows, src_row, dst_row
):  # fmt: skip
    """`copy_rows` over up to `SCALED_POOLS` pools: an 8-bit cache's states with their scales, in one launch.

    Pair ``i = blockIdx.y`` and layer ``l = blockIdx.z`` as in `copy_rows`, row bounds from pool 0;
    the x blocks ``[0, end0)`` copy pool 0 (``d0[l, d] = s0[l, s]``), ``[end0, end1)`` pool 1, and so
    on, ``[end3, ...)`` pool 4. A cache with fewer pools passes its last pool again with an empty
    block range (``end`` equal to the grid's x size), so those blocks never run:

    ```text
    blockIdx.x:  0 .. end0-1 | end0 .. end1-1 | end1 .. end2-1   | end2 .. end3-1 | end3 ..
                 recurrent   | conv           | recurrent scales | conv scales    | residual
    ```

    ``d0, s0 .. d4, s4`` are the ``[L, R_dst, W_k]`` / ``[L, R_src, W_k]`` words of pool ``k``;
    ``end0 .. end3`` the cumulative x-block ends of pools 0..3; ``src_rows``, ``dst_rows``,
    ``use_rows``, ``src_row`` and ``dst_row`` are `copy_rows`'s.

    Grid ``(blocks, n, L)``, block ``(threads,)`` from `launch_shape` over the five slots' words.
    """
    s, d = _row_pair(src_rows, dst_rows, use_rows, src_row, dst_row, s0.shape[1], d0.shape[1])
    if s < 0:
        return
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    if chunk < end0:
        _copy_chunk(d0, layer, d, s0, layer, s, chunk)
    elif chunk < end1:
        _copy_chunk(d1, layer, d, s1, layer, s, chunk - end0)
    elif chunk < end2:
        _copy_chunk(d2, layer, d, s2, layer, s, chunk - end1)
    elif chunk < end3:
        _copy_chunk(d3, layer, d, s3, layer, s, chunk - end2)
    else:
        _copy_chunk(d4, layer, d, s4, layer, s, chunk - end3)


@cuda.jit(cache=False)
def zero_slot_scaled(d0, d1, d2, d3, d4, end0, end1, end2, end3, slot):
    """`zero_slot` over up to `SCALED_POOLS` pools (block ranges as `copy_rows_scaled`), in one launch.

    ``d0 .. d4`` are the ``[L, B, W_k]`` words of pool ``k`` (written), ``end0 .. end3`` the
    cumulative x-block ends of pools 0..3, ``slot`` the slot (``0 <= slot < B``).

    Grid ``(blocks, 1, L)``, block ``(threads,)``.
    """
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    if chunk < end0:
        _zero_row(d0, layer, slot, chunk)
    elif chunk < end1:
        _zero_row(d1, layer, slot, chunk - end0)
    elif chunk < end2:
        _zero_row(d2, layer, slot, chunk - end1)
    elif chunk < end3:
        _zero_row(d3, layer, slot, chunk - end2)
    else:
        _zero_row(d4, layer, slot, chunk - end3)


def scaled_ends(chunks: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """``((end0 .. end3), blocks)`` of `copy_rows_scaled` / `zero_slot_scaled` for pools of ``chunks`` x blocks each.

    ``chunks`` has 2 to `SCALED_POOLS` entries; the missing pools' ends equal the total, so they get no blocks.
    """
    if not 2 <= len(chunks) <= SCALED_POOLS:
        raise ValueError(f"a scaled row launch moves 2 to {SCALED_POOLS} pools, got {len(chunks)}")
    ends, total = [], 0
    for count in chunks:
        total += count
        ends.append(total)
    ends += [total] * (SCALED_POOLS - len(chunks))
    return tuple(ends[: SCALED_POOLS - 1]), total


@cuda.jit(cache=False)
def scatter_tracked(
    dst_a,
    src_a,
    dst_b,
    src_b,
    chunks_a,
    accept_lengths,
    state_indices,
    use_indices,
    seq_len,
    max_accept,
    track_a,
    track_b,
    track_entries,
    track_steps,
):
    """The MTP commit of `scatter_accepted` fused with prefix-checkpoint tracking.

    Row ``b = blockIdx.y`` first commits exactly as [`scatter_accepted`][mamba_cache.core.kernels.scatter_accepted].
    Then, with ``t = track_steps[b]``, ``e = track_entries[b]`` and ``a = accept_lengths[b]``: if ``0 <= t < a``,
    ``t < seq_len``, ``0 <= e < P`` and the row's slot is not ``pad_slot_id`` (a padding row tracks nothing), the
    state after draft step ``t`` is copied into store entry ``e``:
    ``track[l, e, :] = src[l, b * seq_len + t, :]`` for both kinds. The two copies read the same intermediate buffers
    and write disjoint ones, so their order within the block does not matter:

    ```text
    src [L, B*S, W] --row b*V + a-1--> dst   [L, B, W]   (the commit)
                    --row b*V + t----> track [L, P, W]   (the checkpoint)
    ```

    Args:
        dst_a (DeviceNDArray): ``[L, B, W]`` words, the recurrent pool (written).
        src_a (DeviceNDArray): ``[L, B*S, W]`` words, the intermediate recurrent pool (read).
        dst_b (DeviceNDArray): ``[L, B, W']`` words, the conv pool (written).
        src_b (DeviceNDArray): ``[L, B*S, W']`` words, the intermediate conv pool (read).
        chunks_a (int): x blocks that cover one slot of kind a.
        accept_lengths (DeviceNDArray): ``[rows]`` int32; any value is safe.
        state_indices (DeviceNDArray): ``[rows]`` int32 slots (read only if ``use_indices``).
        use_indices (int): 1 to read ``state_indices``, 0 for slot = row.
        seq_len (int): V, the current verify length (``1 <= V <= S``).
        max_accept (int): ``V - 1`` or ``V``.
        track_a (DeviceNDArray): ``[L, P, W]`` words, the store's recurrent entries (written).
        track_b (DeviceNDArray): ``[L, P, W']`` words, the store's conv entries (written).
        track_entries (DeviceNDArray): ``[rows]`` int32 store entry per row; any value is safe.
        track_steps (DeviceNDArray): ``[rows]`` int32 draft step to checkpoint, ``-1`` for none.

    Grid ``(chunks_a + chunks_b, rows, L)``, block ``(threads,)``.
    """
    row = cuda.blockIdx.y
    accepted = accept_lengths[row]
    if accepted_steps(accept_lengths, row, max_accept) > 0:
        _commit_chunk(
            dst_a, src_a, dst_b, src_b, chunks_a, state_indices, use_indices, row, row * seq_len + (accepted - 1)
        )
    step, entry = tracked_step(track_steps, track_entries, row, accepted, seq_len, track_a.shape[1])
    if step < 0 or is_padding(state_indices, use_indices, row):
        return
    layer = cuda.blockIdx.z
    chunk = cuda.blockIdx.x
    src_row = row * seq_len + step
    if chunk < chunks_a:
        _copy_chunk(track_a, layer, entry, src_a, layer, src_row, chunk)
    else:
        _copy_chunk(track_b, layer, entry, src_b, layer, src_row, chunk - chunks_a)
