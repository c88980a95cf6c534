"""Tiled replay kernels: the replay commit at memory speed (the ones the Numba backend launches).

Same launch arguments, same results bit for bit and the same order of operations per element as
:mod:`mamba_cache.replay.kernels` (whose device functions these call: the rounders, ``mamba2_update``,
``gdn_accumulate`` / ``gdn_write``, the row / slot / tracking rules and the conv blocks); what
changes is how the work of one ``(layer, row)`` is spread over threads, because the first kernels
were instruction-bound (Mamba2: five 64-bit divisions and the index math per element) or spilled
(GDN at D = 128: a 128-float column per thread, 255 registers, kilobytes of spill per thread).

Pools and stash are seen as in :mod:`mamba_cache.replay.kernels`::

    rec     [L, B, H*D*N]      element (i, d, n) at (i * D + d) * N + n
    grid  = (chunks_rec + chunks_conv, rows, L),  block = (THREADS,)

Mamba2: a block owns a tile of one head ``i``: ``tile_n`` columns times ``row_groups * RPT`` rows
(``tile_n * row_groups == THREADS``; ``tile_n`` is the power of two >= N, at most THREADS). Thread
``tx`` owns column ``n`` and ``RPT`` rows, strided by ``row_groups`` so a warp's loads are
consecutive words::

    block x -> (i, d_tile, n_tile)        one division each, once per thread
    tx      -> n = n_tile * tile_n + tx % tile_n,   d_r = d_tile * row_groups * RPT + tx // tile_n + r * row_groups

    head i:   n ->  0 1 2 ... tile_n-1
    d  0      t0 t1 t2 ...              r = 0
    d  1      t. t. ..                  (row group 1)
    ...
    d  G      t0 t1 t2 ...              r = 1     (G = row_groups)

Per step a thread loads ``dA[i]`` and ``B[j, n]`` once and ``u[i, d_r]`` per row (one address per
row group: a broadcast), then ``h_r = round(fma(u_r, B, h_r * dA))`` for its ``RPT`` registers.

Gated DeltaNet: a column ``S_i[:, e]`` is split over ``P = ceil(D / 32)`` threads (``P`` rounded up to
a power of two), part ``q`` keeping ``d = 32 q .. 32 q + 31`` in registers. The prediction is one
sequential chain ``pred = fma(S[d, e], k[d], pred)``, d = 0 .. D-1 (the decode step's order), so
part ``q`` continues from the value part ``q - 1`` ended with, handed over through shared memory
(one ``syncthreads`` per part and step); the last part's ``pred`` is read back by all parts::

    block: CB = THREADS / P columns x P parts;  tx = q * CB + c   (consecutive threads: consecutive columns)
    step:  all:     S[d] *= g[i]                        (their 32 d)
           q = 0:   pred = chain(0)            -> shared[0][c]   | sync
           q = 1:   pred = chain(shared[0][c]) -> shared[1][c]   | sync  ... (P parts)
           all:     delta = beta[i] * (v[i, e] - shared[P-1][c]);  S[d] = round(fma(k[d], delta, S[d]))

Each part writes its own shared row, so one barrier per part suffices across steps. The conv blocks
are the first kernels' (one thread per channel).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda, float32

from ..core.numba_backend import SIMULATOR
from ..precision.kernels import load_float32
from .kernels import (
    MAX_KEY_DIM,
    ROUND_STORED,
    _position,
    _replay_conv,
    _rounder,
    _row_slot,
    _step,
    _store_word,
    _track,
    _track_conv,
    gdn_accumulate,
    gdn_write,
    mamba2_update,
    rounding_of,
)

#: Threads per block.
THREADS = 128
#: State rows each Mamba2 thread keeps in registers.
RPT = 8
#: Key-dim values each Gated DeltaNet thread keeps in registers (one part of a column).
PART = 32
#: Most parts of one column: ``MAX_KEY_DIM / PART``.
MAX_PARTS = MAX_KEY_DIM // PART
#: NVVM-level inlining of the GDN step (Numba-level ``inline=True`` refuses a closure of this many
#: arguments); the simulator's ``jit`` takes no such option.
_FORCE_INLINE = {} if SIMULATOR else {"forceinline": True}


def mamba2_tiles(dim: int, size: int) -> tuple[int, int, int, int]:
    """``(tile_n, row_groups, d_tiles, n_tiles)`` of the tiled Mamba2 kernel for head dim D and state size N."""
    tile_n = min(THREADS, 1 << max(0, (size - 1).bit_length()))
    row_groups = THREADS // tile_n
    return tile_n, row_groups, -(-dim // (row_groups * RPT)), -(-size // tile_n)


def gdn_parts(key_dim: int) -> int:
    """Threads sharing one Gated DeltaNet column: ``ceil(D / PART)`` rounded up to a power of two."""
    parts = -(-key_dim // PART)
    return 1 << max(0, (parts - 1).bit_length())


_MAMBA2_KERNELS: dict = {}
_GDN_KERNELS: dict = {}


def replay_mamba2_kernel(rounding: int = ROUND_STORED, bits16: int = 0) -> Any:
    """The tiled Mamba2 replay kernel for a ``rounding`` (``ROUND_*``) and pool kind (``bits16``), cached."""
    key = (rounding, int(bits16))
    kernel = _MAMBA2_KERNELS.get(key)
    if kernel is None:
        kernel = _MAMBA2_KERNELS[key] = _make_mamba2(*key)
    return kernel


def replay_gdn_kernel(key_dim: int, rounding: int = ROUND_STORED, bits16: int = 0) -> Any:
    """The tiled Gated DeltaNet replay kernel for key dim D, a rounding and a pool kind, cached.

    Compile-time: the number of parts ``P`` (:func:`gdn_parts`) and, when ``D == P * PART``, D itself
    (no guards in the d loops); any other D up to ``MAX_KEY_DIM`` is guarded against ``dim`` at run time.
    """
    parts = gdn_parts(key_dim)
    exact = key_dim if key_dim == parts * PART else 0
    key = (parts, exact, rounding, int(bits16))
    kernel = _GDN_KERNELS.get(key)
    if kernel is None:
        kernel = _GDN_KERNELS[key] = _make_gdn(*key)
    return kernel


def _make_mamba2(rounding: int, pool_bits16: int) -> Any:
    rounder = _rounder(rounding)

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
        tile_n,
        row_groups,
        d_tiles,
        n_tiles,
    ):
        """Replay the accepted Mamba2 steps of each row into its slot, every layer, both state kinds.

        Arguments as :func:`mamba_cache.replay.kernels.replay_mamba2`'s, with ``chunks_rec = H *
        d_tiles * n_tiles`` and the tile shape ``tile_n, row_groups, d_tiles, n_tiles``
        (:func:`mamba2_tiles`). Thread layout in the module docstring.

        Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
        """
        layer, row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
        )
        if slot < 0:
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, row, accepted, track_rec.shape[1])
        block = cuda.blockIdx.x
        if block >= chunks_rec:
            c = (block - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
            if c < channels:
                if tracked >= 0:
                    _track_conv(
                        conv, col, track_conv, entry, layer, slot, row, seq_len, tracked, c, channels, width, node_ids,
                        use_nodes,
                    )  # fmt: skip
                _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
            return
        tx = cuda.threadIdx.x
        per_head = d_tiles * n_tiles
        i = block // per_head
        d_tile = (block - i * per_head) // n_tiles
        n_tile = block - i * per_head - d_tile * n_tiles
        group = tx // tile_n
        n = n_tile * tile_n + (tx - group * tile_n)
        if n >= size:
            return
        d0 = d_tile * row_groups * RPT + group
        j = i // (heads // groups)
        first = (i * dim + d0) * size + n  # element (i, d0, n); row r is first + r * row_groups * size
        pitch = row_groups * size
        u_pitch = np.uint64(row_groups)
        state, track = rec[layer, slot], track_rec[layer, entry if entry >= 0 else 0]
        decays, inputs, projections = dA[layer], u[layer], B[layer]
        h = cuda.local.array(RPT, float32)
        for r in range(RPT):  # every load first, then the steps
            if d0 + r * row_groups < dim:
                h[r] = load_float32(state[first + r * pitch], pool_bits16)
        for t in range(accepted):
            step = _step(node_ids, use_nodes, row, seq_len, t)
            decay = decays[step * heads + i]
            b = projections[(step * groups + j) * size + n]
            u_row = np.uint64((step * heads + i) * dim + d0)  # unsigned: no negative-index wrap per element
            position = _position(positions, use_positions, row, t)
            for r in range(RPT):
                if d0 + r * row_groups < dim:
                    h[r] = rounder(
                        mamba2_update(h[r], decay, inputs[u_row + np.uint64(r) * u_pitch], b),
                        mode,
                        exp_bits,
                        man_bits,
                        half,
                        first + r * pitch,
                        position,
                        layer,
                        seed_lo,
                        seed_hi,
                    )
            if t == tracked:
                for r in range(RPT):
                    if d0 + r * row_groups < dim:
                        track[first + r * pitch] = _store_word(h[r], pool_bits16)
        for r in range(RPT):
            if d0 + r * row_groups < dim:
                state[first + r * pitch] = _store_word(h[r], pool_bits16)

    return replay_mamba2_tiled


def _make_gdn(parts: int, exact: int, rounding: int, pool_bits16: int) -> Any:
    rounder = _rounder(rounding)
    columns_per_block = THREADS // parts

    @cuda.jit(device=True, inline=True)
    def key_dim_of(dim):
        return exact if exact else dim

    @cuda.jit(device=True, inline=True)
    def inside(d, dim):  # d < D; always so when D is exactly the parts' span (the guard compiles away)
        return True if exact else d < dim

    @cuda.jit(device=True, **_FORCE_INLINE)
    def step_column(
        s, handover, t, part, local, d_first, n_dim, i, j, e, first, row, layer, heads, size, groups, seq_len,
        decays, strengths, keys, values, node_ids, use_nodes, positions, use_positions, mode, exp_bits, man_bits,
        half, seed_lo, seed_hi,
    ):  # fmt: skip
        """Replayed step ``t`` of this thread's part ``s`` of column ``e``: every thread of the block calls it."""
        step = _step(node_ids, use_nodes, row, seq_len, t)
        decay = decays[step * heads + i]
        key = keys[(step * groups + j) * n_dim + d_first :]  # k[j, d_first:]: constant offsets below
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = s[d] * decay
        for q in range(parts):  # the prediction: one chain over d = 0 .. D-1, part after part
            if part == q:
                pred = float32(0.0) if q == 0 else handover[q - 1, local]
                for d in range(PART):
                    if inside(d_first + d, n_dim):
                        pred = gdn_accumulate(pred, s[d], key[d])
                handover[q, local] = pred
            cuda.syncthreads()
        delta = strengths[step * heads + i] * (values[(step * heads + i) * size + e] - handover[parts - 1, local])
        position = _position(positions, use_positions, row, t)
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = rounder(
                    gdn_write(s[d], key[d], delta),  # k re-read (an L1 hit): 32 registers fewer
                    mode,
                    exp_bits,
                    man_bits,
                    half,
                    first + d * size,
                    position,
                    layer,
                    seed_lo,
                    seed_hi,
                )

    @cuda.jit(cache=False)
    def replay_gdn_tiled(
        rec,
        conv,
        g,
        beta,
        k,
        v,
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
    ):
        """Replay the accepted Gated DeltaNet steps of each row into its slot, every layer, both state kinds.

        Arguments as :func:`mamba_cache.replay.kernels.replay_gdn`'s, with ``chunks_rec =
        ceil(H * N / (THREADS / P))``. Thread layout and the hand-over of the prediction in the module
        docstring; per element the operations and their order are
        :func:`mamba_cache.replay.kernels.gdn_column_step`'s.

        Grid ``(chunks_rec + ceil(C / THREADS), rows, L)``, block ``(THREADS,)``.
        """
        handover = cuda.shared.array((parts, columns_per_block), float32)
        layer, row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], row, node_ids, use_nodes
        )
        if slot < 0:  # block-uniform: no thread of the block reaches a barrier
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, row, accepted, track_rec.shape[1])
        block = cuda.blockIdx.x
        if block >= chunks_rec:  # block-uniform as well
            c = (block - chunks_rec) * cuda.blockDim.x + cuda.threadIdx.x
            if c < channels:
                if tracked >= 0:
                    _track_conv(
                        conv, col, track_conv, entry, layer, slot, row, seq_len, tracked, c, channels, width, node_ids,
                        use_nodes,
                    )  # fmt: skip
                _replay_conv(conv, col, layer, slot, row, seq_len, accepted, c, channels, width, node_ids, use_nodes)
            return
        n_dim = key_dim_of(dim)
        tx = cuda.threadIdx.x
        part = tx // columns_per_block
        local = tx - part * columns_per_block
        column = block * columns_per_block + local
        live = column < heads * size  # a thread past the last column still takes every barrier
        if not live:
            column = 0
        i = column // size
        e = column - i * size
        j = i // (heads // groups)
        d_first = part * PART
        first = (i * n_dim + d_first) * size + e  # element (i, d_first, e); (i, d_first + d, e) is first + d * size
        # the thread's d-range of column e, as strided views: element d of it is (i, d_first + d, e)
        state = rec[layer, slot, first::size]
        track = track_rec[layer, entry if entry >= 0 else 0, first::size]
        decays, strengths, keys, values = g[layer], beta[layer], k[layer], v[layer]
        s = cuda.local.array(PART, float32)
        for d in range(PART):
            s[d] = float32(0.0)
            if live and inside(d_first + d, n_dim):
                s[d] = load_float32(state[d], pool_bits16)
        # the state after step `tracked` is stored between two step loops, not inside one: a store in the
        # loop keeps its 32 loop-invariant addresses live in registers for the whole replay
        split = tracked + 1 if tracked >= 0 else 0
        for t in range(split):
            step_column(s, handover, t, part, local, d_first, n_dim, i, j, e, first, row, layer, heads, size, groups,
                        seq_len, decays, strengths, keys, values, node_ids, use_nodes, positions, use_positions, mode,
                        exp_bits, man_bits, half, seed_lo, seed_hi)  # fmt: skip
        if tracked >= 0 and live:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    track[d] = _store_word(s[d], pool_bits16)
        for t in range(split, accepted):
            step_column(s, handover, t, part, local, d_first, n_dim, i, j, e, first, row, layer, heads, size, groups,
                        seq_len, decays, strengths, keys, values, node_ids, use_nodes, positions, use_positions, mode,
                        exp_bits, man_bits, half, seed_lo, seed_hi)  # fmt: skip
        if live:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    state[d] = _store_word(s[d], pool_bits16)

    return replay_gdn_tiled


def prepare(pools: Any, stash: dict, config: Any, placeholder: Any, launch_class: type) -> tuple:
    """(launch, x blocks, layers) of the tiled replay kernel of ``config.mixer``; as :func:`.kernels.prepare`.

    The launch arguments are :func:`mamba_cache.replay.kernels.prepare`'s by name (the backend
    re-points the same ones per call), the Mamba2 kernel's tile shape appended.
    """
    from ..precision.kernels import store_formats

    layers, slots = config.num_recurrent_layers, config.max_batch_size
    heads, dim, size, groups = (
        config.recurrent_state_num_heads,
        config.recurrent_state_head_dim,
        config.recurrent_state_size,
        config.n_groups,
    )
    rec = pools.recurrent.reshape(layers, slots, heads * dim * size)
    conv = pools.conv.reshape(layers, slots, config.conv_dim * config.conv_kernel)
    dtype = config.recurrent_state_dtype
    mode, exp_bits, man_bits, bits16 = (int(x) for x in store_formats(config, dtype, dtype)[:4])
    half = int(dtype.name == "float16" and mode == 0)
    extra: tuple = ()
    if config.mixer == "mamba2":
        kernel = replay_mamba2_kernel(rounding_of(mode, half), bits16)
        fields = ("dA", "u", "B")
        tile_n, row_groups, d_tiles, n_tiles = mamba2_tiles(dim, size)
        chunks_rec = heads * d_tiles * n_tiles
        extra = (tile_n, row_groups, d_tiles, n_tiles)
    else:
        kernel = replay_gdn_kernel(dim, rounding_of(mode, half), bits16)
        fields = ("g", "beta", "k", "v")
        chunks_rec = -(-heads * size // (THREADS // gdn_parts(dim)))
    chunks_conv = -(-config.conv_dim // THREADS)
    seed = config.rounding_seed
    args = (
        rec,
        conv,
        *(stash[name] for name in fields),
        stash["conv"],
        chunks_rec,
        heads,
        dim,
        size,
        groups,
        config.conv_dim,
        config.conv_kernel,
        mode,
        exp_bits,
        man_bits,
        bits16,
        half,
        seed & 0xFFFFFFFF,
        seed >> 32,
        placeholder,
        0,
        placeholder,
        placeholder,
        0,
        1,
        placeholder.reshape((placeholder.size, 1)),
        0,
        rec,  # tracking off: never written
        conv,
        placeholder,
        placeholder,
        0,
        *extra,
    )
    return launch_class(kernel, args, THREADS), chunks_rec + chunks_conv, layers
