"""The tiled Gated DeltaNet replay kernel body, built by `replay_gdn_kernel` of `mamba_cache.replay.tiled`."""

from __future__ import annotations

from typing import Any

from numba import cuda, float32

from ..core.device import SIMULATOR
from ..precision.kernels import (
    load_float32,
)
from .kernels import (
    MAX_KEY_DIM,
    THREADS,
    _position,
    _rounder,
    _row_slot,
    _step,
    _store_word,
    _track,
    gdn_accumulate,
    gdn_write,
)
from .tiles import _FORCE_INLINE, PART, _stash_row_of_row, _u32, gdn_launch_bounds


def _make_gdn(
    parts: int,
    exact: int,
    rounding: int,
    pool_bits16: int,
    conv_tile: Any,
    stash_row: Any = _stash_row_of_row,
    write_back: bool = True,
) -> Any:
    rounder = _rounder(rounding)
    columns_per_block = THREADS // parts
    key_span = exact if exact else MAX_KEY_DIM  # shared key buffer: one step's k[j, :]
    keys_per_thread = -(-key_span // THREADS)
    scalars = keys_per_thread  # the prefetch buffer: a thread's keys, then g[i], beta[i], v[i, e]
    ahead_size = keys_per_thread + 3
    bounds = gdn_launch_bounds(exact, rounding)
    kernel_options = {"launch_bounds": bounds} if bounds and not SIMULATOR else {}  # the simulator takes none

    @cuda.jit(device=True, inline=True)
    def key_dim_of(dim):
        return exact if exact else dim

    @cuda.jit(device=True, inline=True)
    def inside(d, dim):  # d < D; always so when D is exactly the parts' span (the guard compiles away)
        return True if exact else d < dim

    @cuda.jit(device=True, inline=True)
    def prefetch(ahead, t, row, i, j, e, live, n_dim, heads, size, groups, seq_len, decays, strengths, keys, values,
                 node_ids, use_nodes):  # fmt: skip
        """Load step ``t``'s stash into ``ahead``: the thread's keys, ``g[i]``, ``beta[i]``, ``v[i, e]``."""
        step = _u32(_step(node_ids, use_nodes, row, seq_len, t))
        key_row = _u32(_u32(step * groups + j) * n_dim)
        tx = _u32(cuda.threadIdx.x)
        for q in range(keys_per_thread):
            if tx + q * THREADS < n_dim:
                ahead[q] = keys[_u32(key_row + tx + q * THREADS)]
        head = _u32(step * heads + i)
        ahead[scalars] = decays[head]
        ahead[scalars + 1] = strengths[head]
        ahead[scalars + 2] = values[_u32(head * size + e)] if live else float32(0.0)

    @cuda.jit(device=True, **_FORCE_INLINE)
    def step_column(
        s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first, row, layer,
        heads, size, groups, seq_len, decays, strengths, keys, values, node_ids, use_nodes, positions, use_positions,
        mode, exp_bits, man_bits, half, seed_lo, seed_hi,
    ):  # fmt: skip
        """Replayed step ``t`` of this thread's part ``s`` of column ``e``: every thread of the block calls it.

        On entry ``ahead`` holds step ``t``'s stash (`prefetch`); the keys go to shared buffer
        ``t % 2``, the next step's stash is loaded while this one computes.
        """
        buf = t & 1
        tx = _u32(cuda.threadIdx.x)
        for q in range(keys_per_thread):
            if tx + q * THREADS < n_dim:
                shared_keys[buf, tx + q * THREADS] = ahead[q]
        decay, strength, value = ahead[scalars], ahead[scalars + 1], ahead[scalars + 2]
        if t + 1 < accepted:
            prefetch(ahead, t + 1, row, i, j, e, live, n_dim, heads, size, groups, seq_len, decays, strengths, keys,
                     values, node_ids, use_nodes)  # fmt: skip
        cuda.syncthreads()  # the keys are in; buffer t % 2 was last read in step t - 2, before the previous barrier
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = s[d] * decay
        for q in range(parts):  # the prediction: one chain over d = 0 .. D-1, part after part
            if part == q:
                pred = float32(0.0) if q == 0 else handover[q - 1, local]
                for d in range(PART):
                    if inside(d_first + d, n_dim):
                        pred = gdn_accumulate(pred, s[d], shared_keys[buf, d_first + d])
                handover[q, local] = pred
            cuda.syncthreads()
        delta = strength * (value - handover[parts - 1, local])
        position = _position(positions, use_positions, row, t)
        for d in range(PART):
            if inside(d_first + d, n_dim):
                s[d] = rounder(
                    gdn_write(s[d], shared_keys[buf, d_first + d], delta),
                    mode,
                    exp_bits,
                    man_bits,
                    half,
                    _u32(first + d * size),
                    position,
                    layer,
                    seed_lo,
                    seed_hi,
                )

    @cuda.jit(cache=False, **kernel_options)
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

        Arguments as `launch_args` lays them out, with ``chunks_rec = H *
        ceil(N / (THREADS / P))`` (a block's columns are of one head). Thread layout, the hand-over of
        the prediction and the shared keys in the module docstring; per element the operations and
        their order are [`mamba_cache.replay.kernels.gdn_column_step`][mamba_cache.replay.kernels.gdn_column_step]'s.

        Grid ``(chunks_rec + conv_chunks(C, K), rows, L)``, block ``(THREADS,)``.
        """
        handover = cuda.shared.array((parts, columns_per_block), float32)
        shared_keys = cuda.shared.array((2, key_span), float32)
        layer, grid_row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted, slot = _row_slot(
            accept_lengths, state_indices, use_indices, seq_len, rec.shape[1], grid_row, node_ids, use_nodes
        )
        if slot < 0:  # block-uniform: no thread of the block reaches a barrier
            return
        tracked, entry = _track(track_entries, track_steps, use_tracking, grid_row, accepted, track_rec.shape[1])
        row = stash_row(grid_row, slot)  # the stash row (and positions entry) this row reads
        block = cuda.blockIdx.x
        if block >= chunks_rec:  # block-uniform as well
            conv_tile(conv, col, track_conv, entry, tracked, layer, slot, row, seq_len, accepted, block - chunks_rec,
                      channels, width, node_ids, use_nodes)  # fmt: skip
            return
        n_dim = _u32(key_dim_of(dim))
        n_heads, n_size, n_groups = _u32(heads), _u32(size), _u32(groups)
        tx = _u32(cuda.threadIdx.x)
        part = _u32(tx // columns_per_block)
        local = _u32(tx - part * columns_per_block)
        tiles = _u32(_u32(n_size + (columns_per_block - 1)) // columns_per_block)  # column tiles per head
        i = _u32(_u32(block) // tiles)
        e = _u32(_u32(block - i * tiles) * columns_per_block + local)
        live = e < n_size  # a thread past the head's last column still loads keys and takes every barrier
        if not live:
            e = _u32(0)
        j = _u32(i // _u32(n_heads // n_groups))
        d_first = _u32(part * PART)
        first = _u32(_u32(i * n_dim + d_first) * n_size + e)  # (i, d_first, e); (i, d_first + d, e) is + d * N
        # the thread's d-range of column e, as strided views: element d of it is (i, d_first + d, e)
        state = rec[layer, slot, first::size]
        track = track_rec[layer, entry if entry >= 0 else 0, first::size]
        decays, strengths, keys, values = g[layer], beta[layer], k[layer], v[layer]
        s = cuda.local.array(PART, float32)
        for d in range(PART):
            s[d] = float32(0.0)
            if live and inside(d_first + d, n_dim):
                s[d] = load_float32(state[d], pool_bits16)
        ahead = cuda.local.array(ahead_size, float32)
        prefetch(ahead, 0, row, i, j, e, live, n_dim, n_heads, n_size, n_groups, seq_len, decays, strengths, keys,
                 values, node_ids, use_nodes)  # fmt: skip
        # the state after step `tracked` is stored between two step loops, not inside one: a store in the
        # loop keeps its 32 loop-invariant addresses live in registers for the whole replay
        split = tracked + 1 if tracked >= 0 else 0
        for t in range(split):
            step_column(s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first,
                        row, layer, n_heads, n_size, n_groups, seq_len, decays, strengths, keys, values, node_ids,
                        use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo,
                      seed_hi)  # fmt: skip
        if tracked >= 0 and live:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    track[d] = _store_word(s[d], pool_bits16)
        for t in range(split, accepted):
            step_column(s, handover, shared_keys, ahead, t, accepted, part, local, d_first, n_dim, i, j, e, live, first,
                        row, layer, n_heads, n_size, n_groups, seq_len, decays, strengths, keys, values, node_ids,
                        use_nodes, positions, use_positions, mode, exp_bits, man_bits, half, seed_lo,
                      seed_hi)  # fmt: skip
        if live and write_back:
            for d in range(PART):
                if inside(d_first + d, n_dim):
                    state[d] = _store_word(s[d], pool_bits16)

    return replay_gdn_tiled
