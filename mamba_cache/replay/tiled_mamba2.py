"""The tiled Mamba2 replay kernel body, built by `replay_mamba2_kernel` of `mamba_cache.replay.tiled`."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float32

from ..precision.kernels import (
    bfloat162_rn_bits,
    float32_bits,
    float32_from_bits,
    half2_rn_bits,
    half_bits_to_float32,
    half_high_float32,
    half_low_float32,
    half_rn_bits,
    load_float32,
)
from .kernels import (
    _position,
    _rounder,
    _row_slot,
    _step,
    _store_word,
    _track,
    bfloat16_in_hardware,
    mamba2_update,
    round_bfloat16,
)
from .tiles import _FORCE_INLINE, CPT, _at, _stash_row_of_row, _u32, mamba2_packed, mamba2_rows, mamba2_tiles


def _make_mamba2(
    rounding: int,
    pool_bits16: int,
    head_dim: int,
    state_size: int,
    group_heads: int,
    word_elems: int,
    conv_tile: Any,
    stash_row: Any = _stash_row_of_row,
    write_back: bool = True,
) -> Any:
    rounder = _rounder(rounding)
    packed = mamba2_packed(rounding, pool_bits16, word_elems)
    rpt = mamba2_rows(packed)
    cells = rpt * CPT
    lanes, row_groups, d_tiles, n_tiles = mamba2_tiles(head_dim, state_size, rpt)
    tile_rows, tile_cols = row_groups * rpt, lanes * CPT
    per_head = d_tiles * n_tiles
    rows_exact = head_dim % rpt == 0  # every live thread has all its rows live
    word_pitch = state_size // word_elems if word_elems else 0  # uint64 words per state row
    words = CPT // word_elems if word_elems else 1  # uint64 words of a thread's row
    elem_bits = 64 // word_elems if word_elems else 64
    elem_mask = (1 << elem_bits) - 1
    word_cells, elem_cells = rpt * words, (1 if word_elems else cells)  # the raw loads' buffers
    pairs = CPT // 2  # uint32 pairs of a packed tile row
    pairs_in_hardware = bfloat16_in_hardware()  # cvt.rn.f16x2.f32 and cvt.rn.bf16x2.f32: sm_80 and up too
    tile_cells, tile_type = (rpt * pairs, np.uint32) if packed else (cells, float32)

    @cuda.jit(device=True, inline=True)
    def low_of(w):
        """The float32 of the element in bits 0-15 of a packed pair (exact)."""
        if pool_bits16:
            return float32_from_bits(w << np.uint32(16))
        return half_low_float32(w)

    @cuda.jit(device=True, inline=True)
    def high_of(w):
        """The float32 of the element in bits 16-31 of a packed pair (exact)."""
        if pool_bits16:
            return float32_from_bits(w & np.uint32(0xFFFF0000))
        return half_high_float32(w)

    @cuda.jit(device=True, inline=True)
    def round_pair(low, high):
        """Two step results rounded to the pool's format, packed (``low`` in bits 0-15).

        The bits of the rounder of each. On an sm_80+ GPU one ``cvt.rn.f16x2.f32`` /
        ``cvt.rn.bf16x2.f32``; the bfloat16 one without the rounder's NaN select, because a value
        rounded here is an ``FFMA``'s result, and the GPU's arithmetic returns the canonical NaN
        ``0x7FFFFFFF``, which both round to ``0x7FFF`` (``tests/test_replay.py`` pins it on the GPU).
        Elsewhere (an older GPU, the simulator) the one-value rounding of each.
        """
        if pairs_in_hardware:
            return bfloat162_rn_bits(low, high) if pool_bits16 else half2_rn_bits(low, high)
        if pool_bits16:
            return (float32_bits(round_bfloat16(low)) >> np.uint32(16)) | (
                float32_bits(round_bfloat16(high)) & np.uint32(0xFFFF0000)
            )
        return half_rn_bits(low) | (half_rn_bits(high) << np.uint32(16))

    @cuda.jit(device=True, inline=True)
    def element_of(h, c):
        """Element ``c`` (``r * CPT + k``) of the thread's tile, as float32."""
        if packed:
            w = h[c // 2]
            return high_of(w) if c % 2 else low_of(w)
        return h[c]

    @cuda.jit(device=True, inline=True)
    def unpack(w, e):
        """Element ``e`` of the pool's uint64 word ``w``, as float32 (exact)."""
        x = np.uint32((w >> np.uint64(e * elem_bits)) & np.uint64(elem_mask))
        if word_elems == 2:
            return float32_from_bits(x)
        if pool_bits16:
            return float32_from_bits(x << np.uint32(16))
        return half_bits_to_float32(x)

    @cuda.jit(device=True, inline=True)
    def bits_of(h):
        """The pool element's bits of a state value already rounded to the pool's format, as uint64."""
        if word_elems == 2:
            return np.uint64(float32_bits(h))
        if pool_bits16:
            return np.uint64(float32_bits(h) >> np.uint32(16))
        return np.uint64(half_rn_bits(h))  # exact: h is a float16 value

    @cuda.jit(device=True, inline=True)
    def fetch(u_next, b_next, t, row, i, j, d0, n0, last_row, last_col, heads, groups, seq_len, decays, inputs,
              projections, node_ids, use_nodes):  # fmt: skip
        """Step ``t``'s stash for this thread, returning ``dA[i]``.

        ``u[i, d]`` of its rows go into ``u_next``, ``B[j, n]`` of its columns into ``b_next``; a
        row or column past the edge gets the last live one's (it is computed, never stored).
        """
        step = _u32(_step(node_ids, use_nodes, row, seq_len, t))
        head = _u32(step * heads + i)
        u_first = np.uint64(_u32(head * head_dim + d0))
        b_first = np.uint64(_u32(_u32(step * groups + j) * state_size + n0))
        for r in range(rpt):
            u_next[r] = inputs[u_first + np.uint64(min(r, last_row))]
        for k in range(CPT):
            b_next[k] = projections[b_first + np.uint64(min(k, last_col))]
        return decays[head]

    @cuda.jit(device=True, **_FORCE_INLINE)
    def replay_steps(
        h, u_next, b_next, decay_next, start, stop, accepted, row, layer, i, j, d0, n0, first, last_row, last_col,
        heads, groups, seq_len, decays, inputs, projections, node_ids, use_nodes, positions, use_positions, mode,
        exp_bits, man_bits, half, seed_lo, seed_hi,
    ):  # fmt: skip
        """Steps ``start .. stop-1`` on the thread's tile ``h`` (``rpt x CPT``, row-major), in place.

        ``h`` holds packed pairs ([`mamba2_packed`][mamba_cache.replay.tiles.mamba2_packed]) or float32 elements.

        On entry ``u_next``, ``b_next``, ``decay_next`` hold step ``start``'s stash; each step
        loads the next one's before it computes. Every element of the tile is computed (no guard in
        the loop: past the edge the tile repeats its last live row or column, which is never
        stored). Returns the next step's ``dA[i]``.
        """
        u_now = cuda.local.array(rpt, float32)
        b_now = cuda.local.array(CPT, float32)
        for t in range(start, stop):
            decay = decay_next
            for r in range(rpt):
                u_now[r] = u_next[r]
            for k in range(CPT):
                b_now[k] = b_next[k]
            if t + 1 < accepted:
                decay_next = fetch(u_next, b_next, t + 1, row, i, j, d0, n0, last_row, last_col, heads, groups,
                                   seq_len, decays, inputs, projections, node_ids, use_nodes)  # fmt: skip
            if packed:
                for r in range(rpt):
                    for p in range(pairs):
                        w = h[r * pairs + p]
                        h[r * pairs + p] = round_pair(
                            mamba2_update(low_of(w), decay, u_now[r], b_now[2 * p]),
                            mamba2_update(high_of(w), decay, u_now[r], b_now[2 * p + 1]),
                        )
                continue
            position = _position(positions, use_positions, row, t)
            for r in range(rpt):
                for k in range(CPT):
                    h[r * CPT + k] = rounder(
                        mamba2_update(h[r * CPT + k], decay, u_now[r], b_now[k]),
                        mode,
                        exp_bits,
                        man_bits,
                        half,
                        _u32(first + r * state_size + k),
                        position,
                        layer,
                        seed_lo,
                        seed_hi,
                    )
        return decay_next

    @cuda.jit(cache=False)
    def replay_mamba2_tiled(
        rec,
        conv,
        dA,  # noqa: N803
        u,
        B,  # noqa: N803
        col,
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        channels,
        width,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed_lo,
        seed_hi,
        positions,
        use_positions,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        node_ids,
        use_nodes,
        track_rec,
        track_conv,
        track_entries,
        track_steps,
        use_tracking,
        rec_words,
    ):
        """Replay the accepted Mamba2 steps of each row into its slot, every layer, both state kinds.

        Arguments as `launch_args` lays them out (``dim`` and ``size`` go
        unread: the kernel's head shape is compile-time), with ``chunks_rec = H *``
        [`mamba2_head_blocks`][mamba_cache.replay.tiled.mamba2_head_blocks] (its
        [`mamba2_tiles`][mamba_cache.replay.tiles.mamba2_tiles]) and ``rec_words``, the recurrent pool seen as uint64
        words ``[L, B, H*D*N / word_elems]`` (with ``word_elems`` 0: ``rec`` again, unused). Thread layout in the module
        docstring. Index arithmetic is 32-bit unsigned (a slot holds fewer than 2**32 elements; ``prepare`` checks).

        Grid ``(chunks_rec + conv_chunks(C, K), rows, L)``, block ``(THREADS,)``.
        """
        layer, grid_row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], grid_row, node_ids, use_nodes
        )
        if slot < 0:
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, grid_row, accepted, track_rec.shape[1])
        row = stash_row(grid_row, slot)  # the stash row (and positions entry) this row reads
        block = cuda.blockIdx.x
        if block >= chunks_rec:
            conv_tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, block - chunks_rec,
                      channels, width, node_ids, use_nodes)  # fmt: skip
            return
        n_heads, n_groups = _u32(heads), _u32(groups)
        tx = _u32(cuda.threadIdx.x)
        i = _u32(_u32(block) // per_head)  # divisions by constants: multiply and shift
        rest = _u32(_u32(block) - i * per_head)
        d_tile = _u32(rest // n_tiles)
        n_tile = _u32(rest - d_tile * n_tiles)
        group = _u32(tx // lanes)
        d0 = _u32(_u32(d_tile * tile_rows) + group * rpt)
        n0 = _u32(_u32(n_tile * tile_cols) + _u32(tx - group * lanes) * CPT)
        if d0 >= head_dim or n0 >= state_size:  # past the head's edge (no barrier in this kernel)
            return
        # live rows r < rows, live columns k < cols; loads past the edge repeat the last live ones
        rows = _u32(rpt) if rows_exact else min(_u32(rpt), _u32(head_dim - d0))
        cols = _u32(CPT) if word_elems else min(_u32(CPT), _u32(state_size - n0))  # words: N is a multiple of CPT
        last_row, last_col = _u32(rows - 1), _u32(cols - 1)
        j = _u32(i // group_heads)
        first = _u32(_u32(i * head_dim + d0) * state_size + n0)  # element (i, d0, n0); (r, k) is first + r * N + k
        decays, inputs, projections = dA[layer], u[layer], B[layer]
        state = rec[layer, slot]
        # every load first: the state's raw words, then step 0's stash, so the thread waits for memory
        # once; the conversions after both
        raw_words = cuda.local.array(word_cells, np.uint64)
        raw = cuda.local.array(elem_cells, rec.dtype)  # the pool's own element type (uint16 for bfloat16)
        state_words = rec_words[layer, slot]
        if word_elems:
            for r in range(rpt):
                for w in range(words):
                    raw_words[r * words + w] = state_words[_at(first // word_elems, min(r, last_row), word_pitch, w)]
        else:
            for r in range(rpt):
                for k in range(CPT):
                    raw[r * CPT + k] = state[_at(first, min(r, last_row), state_size, min(k, last_col))]
        u_next = cuda.local.array(rpt, float32)
        b_next = cuda.local.array(CPT, float32)
        decay_next = fetch(u_next, b_next, 0, row, i, j, d0, n0, last_row, last_col, n_heads, n_groups, seq_len,
                           decays, inputs, projections, node_ids, use_nodes)  # fmt: skip
        h = cuda.local.array(tile_cells, tile_type)
        if packed:  # the words as they are: a row's CPT / 2 pairs are the halves of its uint64 words
            for c in range(rpt * words):
                h[2 * c] = np.uint32(raw_words[c] & np.uint64(0xFFFFFFFF))
                h[2 * c + 1] = np.uint32(raw_words[c] >> np.uint64(32))
        else:
            for r in range(rpt):
                for k in range(CPT):
                    if word_elems:
                        h[r * CPT + k] = unpack(raw_words[r * words + k // word_elems], k % word_elems)
                    else:
                        h[r * CPT + k] = load_float32(raw[r * CPT + k], pool_bits16)
        # the state after step `tracked` is stored between two step loops, not inside one (a store
        # inside the loop keeps its addresses live in registers for the whole replay)
        split = tracked + 1 if tracked >= 0 else 0
        decay_next = replay_steps(h, u_next, b_next, decay_next, 0, split, accepted, row, layer, i, j, d0, n0, first,
                                  last_row, last_col, n_heads, n_groups, seq_len, decays, inputs, projections,
                                  node_ids, use_nodes, positions, use_positions, mode, exp_bits, man_bits, half,
                                  seed_lo, seed_hi)  # fmt: skip
        if tracked >= 0:  # rare (a prefix-store checkpoint): element stores into the entry
            track = track_rec[layer, entry]
            for r in range(rpt):
                for k in range(CPT):
                    if r < rows and k < cols:
                        track[_at(first, r, state_size, k)] = _store_word(element_of(h, r * CPT + k), pool_bits16)
        replay_steps(h, u_next, b_next, decay_next, split, accepted, accepted, row, layer, i, j, d0, n0, first,
                     last_row, last_col, n_heads, n_groups, seq_len, decays, inputs, projections, node_ids,
                     use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo, seed_hi)  # fmt: skip
        if not write_back:
            return
        if packed:
            for r in range(rpt):
                if r < rows:
                    for w in range(words):
                        c = r * words + w
                        word = np.uint64(h[2 * c]) | (np.uint64(h[2 * c + 1]) << np.uint64(32))
                        state_words[_at(first // word_elems, r, word_pitch, w)] = word
        elif word_elems:
            for r in range(rpt):
                if r < rows:
                    for w in range(words):
                        word = np.uint64(0)
                        for e in range(word_elems):
                            word |= bits_of(h[r * CPT + w * word_elems + e]) << np.uint64(e * elem_bits)
                        state_words[_at(first // word_elems, r, word_pitch, w)] = word
        else:
            for r in range(rpt):
                for k in range(CPT):
                    if r < rows and k < cols:
                        state[_at(first, r, state_size, k)] = _store_word(h[r * CPT + k], pool_bits16)

    replay_mamba2_tiled.head_blocks = per_head  # the grid's blocks per head, for prepare (mamba2_head_blocks)
    return replay_mamba2_tiled
