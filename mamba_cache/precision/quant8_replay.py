"""CUDA kernels of the replay commit and the checkpoint fold into an 8-bit recurrent state, both mixers.

They repeat [`replay_commit`][mamba_cache.replay.reference.replay_commit] with 8-bit ``scales``: a group
``(h, d)`` is read as ``stored * scale``, every step is computed in float32 (the reference's order: two
rounded products and a rounded sum, no fused multiply-add) and stored by the 8-bit rule
([`mamba_cache.precision.quant8_kernels`][mamba_cache.precision.quant8_kernels]: the group's scale, its
residual fed back under error feedback, the words of the state's token count); the conv window takes
the stashed columns, an 8-bit column moved with its scales, never rounded again. One launch does both
kinds, values and scales together (no allocation, no host synchronisation).

The same two kernels serve three callers, by their switches:

```text
replay commit      ring 0  write_back 1   row b reads stash rows b * V + t and positions[b]
checkpoint fold    ring 1  write_back 1   row b reads its slot s's ring, s * R + t, and positions[s]
read (capture,     ring 1  write_back 0   the state after step track_steps[b] goes to row
copy, tracking)                           track_entries[b] of the track arrays; the slot is not written
```

With tracking on (``use_tracking``), a row whose ``t = track_steps[b]`` is in ``[0, a)`` and whose entry is
in range (`_track`) also stores the state after step ``t`` (values, scales, residuals, and the window after
``t + 1`` columns with their scales) into that entry.

Mamba2 (`replay8_mamba2`): a warp a group ``(h, d)``, each lane ``N / 32`` elements in registers
(``N <= REPLAY_MAX_N``), the group's amax reduced through shared memory (`_warp_amax`).

Gated DeltaNet (`replay8_gdn`): a block a head ``i``. Every column's prediction needs every row of the
column, and every row's scale every column of the row, so the state stays in its 8-bit form between steps
(its bytes and scales are the state exactly) and each step is two passes:

```text
pass A  a thread a column e:  pred = sum over d (increasing) of (S[d, e] * g) * k[d]
                              delta[e] = beta * (v[e] - pred)                -> shared memory  | sync
pass B  a warp a row d:       x[e] = (S[d, e] * g) + k[d] * delta[e]  (+ residual)
                              amax over the row (warp), scale, store                            | sync
```

The state before step 0 is the slot's; later steps read what the previous step stored: the slot with
``write_back``, else the tracked entry (a read computes in its destination).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..replay.kernels import _row_slot, _step, _track
from .kernels import convert_bits, float32_bits, float32_from_bits
from .quant8_kernels import (
    COMMIT_THREADS,
    QMAX,
    _warp_amax,
    amax_step,
    dequantise_code,
    group_scale,
    philox_word,
    quantise_code,
)

__all__ = ["REPLAY_MAX_N", "replay8_gdn", "replay8_mamba2"]

#: The largest ``N`` the 8-bit replay kernels hold (``N / 32`` elements a lane; GDN's ``delta`` row).
REPLAY_MAX_N = 256
_PER_LANE = REPLAY_MAX_N // 32


@cuda.jit(device=True, inline="always")
def _residual_of(x, byte, scale, code):
    """The error-feedback residual ``x - stored * scale`` as bfloat16, read back as float32 (0 for NaN)."""
    error = np.float32(x - dequantise_code(byte, scale, code))
    bits = np.uint64(0) if error != error else convert_bits(float32_bits(error), 8, 23, 8, 7, False, 0)
    return float32_from_bits(bits << np.uint64(16))


@cuda.jit(device=True, inline="always")
def _stored_byte(x, scale, code, stochastic, element, position, layer, seed_lo, seed_hi):
    """The byte a recurrent element stores: ``x`` at ``scale``, the words of ``element`` after ``position`` tokens."""
    r = np.uint64(0)
    if stochastic:
        r = philox_word(element, position, layer, 0, seed_lo, seed_hi)
    return quantise_code(x, scale, code, stochastic, r)


@cuda.jit(device=True, inline="always")
def _bf16(raw):
    """A stored bfloat16 residual (uint16 bits) as float32."""
    return float32_from_bits(np.uint64(raw) << np.uint64(16))


@cuda.jit(device=True, inline="always")
def _row_setup(accept, nodes, state_indices, positions, track_rec, track_entries, track_steps, use_indices,
               use_nodes, use_positions, use_tracking, ring, write_back, seq_len, slots):  # fmt: skip
    """(slot, accepted, steps to run, tracked step, entry, stash row, first position) of this block's row.

    ``slot`` is -1 when the row does nothing: it commits nothing, or it is a read (no ``write_back``) of no
    tracked step.
    """
    b = cuda.blockIdx.y
    a, slot = _row_slot(accept, state_indices, use_indices, seq_len, slots, b, nodes, use_nodes)
    tracked, entry = _track(track_entries, track_steps, use_tracking, b, a, track_rec.shape[1])
    steps = a if write_back else tracked + 1
    if slot < 0 or steps <= 0:
        return -1, 0, 0, -1, -1, 0, np.int64(0)
    srow = slot if ring else b
    start = np.int64(positions[srow]) if use_positions else np.int64(0)
    return slot, a, steps, tracked, entry, srow, start


@cuda.jit(device=True)
def _conv8_put(dst, dst_scales, drow, conv, conv_scales, stash_conv, stash_conv_scales, layer, slot, srow, nodes,
               use_nodes, seq_len, j, source, block, first, last, lane, width, conv8, esz):  # fmt: skip
    """Column ``j`` of row ``drow`` of ``dst`` = column ``source`` of ``window ++ stashed columns``.

    Channels ``first .. last - 1`` (the warp's block), each lane its own; lane 0 moves the block's scale
    when the window is 8-bit.
    """
    if source < width:
        for c in range(first + lane, last, 32):
            for e in range(esz):
                dst[layer, drow, c, j * esz + e] = conv[layer, slot, c, source * esz + e]
        if conv8 and lane == 0:
            dst_scales[layer, drow, block, j] = conv_scales[layer, slot, block, source]
        return
    row = _step(nodes, use_nodes, srow, seq_len, source - width)
    for c in range(first + lane, last, 32):
        for e in range(esz):
            dst[layer, drow, c, j * esz + e] = stash_conv[layer, row, c * esz + e]
    if conv8 and lane == 0:
        dst_scales[layer, drow, block, j] = stash_conv_scales[layer, row, block]


@cuda.jit(device=True)
def _conv8_rows(conv, conv_scales, stash_conv, stash_conv_scales, track_conv, track_conv_scales, layer, slot, srow,
                nodes, use_nodes, seq_len, a, tracked, entry, write_back, conv8, esz, first_warp,
                all_warps):  # fmt: skip
    """The conv part of a row: a warp a block of 64 channels; the tracked window first, then the slot's, in place.

    Column ``j`` of the result is column ``j + a`` of ``window ++ stashed columns`` (increasing ``j``: a
    column is read before it is overwritten); the tracked window is column ``j + tracked + 1``.
    """
    lane = cuda.threadIdx.x % 32
    channels, width = conv.shape[2], conv.shape[3] // esz
    blocks = -(-channels // 64)
    for k in range(-(-blocks // all_warps)):
        block = first_warp + k * all_warps
        if block >= blocks:
            continue
        first = block * 64
        last = first + 64 if first + 64 < channels else channels
        if tracked >= 0:
            for j in range(width):
                _conv8_put(track_conv, track_conv_scales, entry, conv, conv_scales, stash_conv, stash_conv_scales,
                           layer, slot, srow, nodes, use_nodes, seq_len, j, j + tracked + 1, block, first, last, lane,
                           width, conv8, esz)  # fmt: skip
        if write_back:
            for j in range(width):
                _conv8_put(conv, conv_scales, slot, conv, conv_scales, stash_conv, stash_conv_scales, layer, slot,
                           srow, nodes, use_nodes, seq_len, j, j + a, block, first, last, lane, width, conv8,
                           esz)  # fmt: skip


@cuda.jit(cache=False)
def replay8_mamba2(
    # the 8-bit recurrent pool [L, B, H*D, N] (uint8), its scales [L, B, H*D], residual [L, B, H*D, N] (uint16)
    rec, rec_scales, rec_residual,
    # the conv window as bytes [L, B, C, K*esz], its scales [L, B, ceil(C/64), K] (8-bit) or a stand-in
    conv, conv_scales,
    # the stash (or ring), flat per step: dA [L, rows, H], u [L, rows, H*D], B [L, rows, G, N],
    # conv [L, rows, C*esz], conv_scales [L, rows, ceil(C/64)] (8-bit) or a stand-in
    stash_dA, stash_u, stash_B, stash_conv, stash_conv_scales,
    accept, nodes, state_indices, positions,
    # tracking: entries laid out as the pools [L, P, ...], the entry and step of each row
    track_rec, track_rec_scales, track_residual, track_conv, track_conv_scales, track_entries, track_steps,
    use_indices, use_nodes, use_positions, use_tracking, ring, write_back,
    seq_len, heads, rec_code, conv8, esz, feedback, stochastic, seed_lo, seed_hi,
):  # fmt: skip
    """Replay (or fold, or read) Mamba2 rows into an 8-bit recurrent state, both kinds in one launch.

    Row ``b`` replays its accepted steps ``t`` as the module docstring says: the group ``(h, d)`` reads
    ``stored * scale``, computes ``(h * dA) + (u * B)`` in float32 and is stored by the 8-bit rule after
    every step. Grid ``(x, active, L)``, block ``(COMMIT_THREADS,)``: a warp a recurrent group (each lane
    ``N / 32`` elements in registers) or a conv block of 64 channels, as in ``commit8``.
    """
    layer = cuda.blockIdx.z
    slot, a, steps, tracked, entry, srow, start = _row_setup(
        accept, nodes, state_indices, positions, track_rec, track_entries, track_steps, use_indices, use_nodes,
        use_positions, use_tracking, ring, write_back, seq_len, rec.shape[1],
    )  # fmt: skip
    if slot < 0:
        return
    lane = cuda.threadIdx.x % 32
    warps = cuda.blockDim.x // 32
    first_warp = cuda.blockIdx.x * warps + cuda.threadIdx.x // 32
    all_warps = cuda.gridDim.x * warps
    amax_buf = cuda.shared.array(COMMIT_THREADS, np.float32)
    flag_buf = cuda.shared.array(COMMIT_THREADS, np.int32)
    groups, size = rec.shape[2], rec.shape[3]
    per_group = heads // stash_B.shape[2]
    state = cuda.local.array(_PER_LANE, np.float32)
    residual = cuda.local.array(_PER_LANE, np.float32)
    stored = cuda.local.array(_PER_LANE, np.int64)
    for k in range(-(-groups // all_warps)):  # the same count in every warp (syncthreads inside)
        g = first_warp + k * all_warps
        live = g < groups
        h = g // (groups // heads) if live else 0
        scale = rec_scales[layer, slot, g] if live else np.float32(1.0)
        for i in range(_PER_LANE):
            n = lane + 32 * i
            if live and n < size:
                stored[i] = np.int64(rec[layer, slot, g, n])
                state[i] = dequantise_code(stored[i], scale, rec_code)
                residual[i] = _bf16(rec_residual[layer, slot, g, n]) if feedback else np.float32(0.0)
        for t in range(steps):
            row = _step(nodes, use_nodes, srow, seq_len, t)
            amax = np.float32(0.0)
            finite = True
            if live:
                decay = stash_dA[layer, row, h]
                u = stash_u[layer, row, g]
                for i in range(_PER_LANE):
                    n = lane + 32 * i
                    if n < size:
                        x = np.float32(state[i] * decay) + np.float32(u * stash_B[layer, row, h // per_group, n])
                        if feedback:
                            x = np.float32(x + residual[i])
                        state[i] = x  # the value to quantise, for now
                        amax, finite = amax_step(x, amax, finite)
            amax, finite = _warp_amax(amax, finite, amax_buf, flag_buf)
            if not live:
                continue
            scale = group_scale(amax, finite, QMAX[rec_code])
            for i in range(_PER_LANE):
                n = lane + 32 * i
                if n < size:
                    x = state[i]
                    stored[i] = _stored_byte(x, scale, rec_code, stochastic, g * size + n, start + t + 1, layer,
                                             seed_lo, seed_hi)  # fmt: skip
                    state[i] = dequantise_code(stored[i], scale, rec_code)
                    if feedback:
                        residual[i] = _residual_of(x, stored[i], scale, rec_code)
                    if t == tracked:
                        track_rec[layer, entry, g, n] = stored[i]
                        if feedback:
                            track_residual[layer, entry, g, n] = float32_bits(residual[i]) >> np.uint32(16)
            if t == tracked and lane == 0:
                track_rec_scales[layer, entry, g] = scale
        if live and write_back:
            for i in range(_PER_LANE):
                n = lane + 32 * i
                if n < size:
                    rec[layer, slot, g, n] = stored[i]
                    if feedback:
                        rec_residual[layer, slot, g, n] = float32_bits(residual[i]) >> np.uint32(16)
            if lane == 0:
                rec_scales[layer, slot, g] = scale
    _conv8_rows(conv, conv_scales, stash_conv, stash_conv_scales, track_conv, track_conv_scales, layer, slot, srow,
                nodes, use_nodes, seq_len, a, tracked, entry, write_back, conv8, esz, first_warp,
                all_warps)  # fmt: skip


@cuda.jit(device=True, inline="always")
def _gdn_state(rec, rec_scales, track_rec, track_scales, from_slot, layer, slot, entry, g, n, code):
    """Element ``(g, n)`` of the state before this step, ``stored * scale``: the slot's or the entry's."""
    if from_slot:
        return dequantise_code(rec[layer, slot, g, n], rec_scales[layer, slot, g], code)
    return dequantise_code(track_rec[layer, entry, g, n], track_scales[layer, entry, g], code)


@cuda.jit(cache=False)
def replay8_gdn(
    # the 8-bit recurrent pool [L, B, H*D, N] (uint8), its scales [L, B, H*D], residual [L, B, H*D, N] (uint16)
    rec, rec_scales, rec_residual,
    # the conv window as bytes [L, B, C, K*esz], its scales [L, B, ceil(C/64), K] (8-bit) or a stand-in
    conv, conv_scales,
    # the stash (or ring), flat per step: g [L, rows, H], beta [L, rows, H], k [L, rows, G, D],
    # v [L, rows, H, N], conv [L, rows, C*esz], conv_scales [L, rows, ceil(C/64)] (8-bit) or a stand-in
    stash_g, stash_beta, stash_k, stash_v, stash_conv, stash_conv_scales,
    accept, nodes, state_indices, positions,
    track_rec, track_rec_scales, track_residual, track_conv, track_conv_scales, track_entries, track_steps,
    use_indices, use_nodes, use_positions, use_tracking, ring, write_back,
    seq_len, heads, rec_code, conv8, esz, feedback, stochastic, seed_lo, seed_hi,
):  # fmt: skip
    """Replay (or fold, or read) Gated DeltaNet rows into an 8-bit recurrent state, both kinds in one launch.

    Per step, value head ``i`` and key head ``j = i // (H / G)``, as
    [`gdn_step`][mamba_cache.replay.reference.gdn_step] computes it (float32, each product and sum
    rounded): ``decayed = S * g``; ``pred[e] = sum over d, increasing, of decayed[d, e] * k[d]``;
    ``delta[e] = beta * (v[e] - pred[e])``; ``x[d, e] = decayed[d, e] + k[d] * delta[e]``, then each row
    ``(i, d)`` stored by the 8-bit rule. Two passes a step (module docstring).

    Grid ``(H + ceil(ceil(C / 64) / warps), active, L)``, block ``(COMMIT_THREADS,)``: block ``x < H`` the
    head ``x``, the others the conv blocks (a warp a block of 64 channels).
    """
    layer = cuda.blockIdx.z
    slot, a, steps, tracked, entry, srow, start = _row_setup(
        accept, nodes, state_indices, positions, track_rec, track_entries, track_steps, use_indices, use_nodes,
        use_positions, use_tracking, ring, write_back, seq_len, rec.shape[1],
    )  # fmt: skip
    if slot < 0:  # block-uniform: no thread of the block reaches a barrier
        return
    tid, threads = cuda.threadIdx.x, cuda.blockDim.x
    lane, warp, warps = tid % 32, tid // 32, threads // 32
    if cuda.blockIdx.x >= heads:  # block-uniform as well
        first_warp = (cuda.blockIdx.x - heads) * warps + warp
        _conv8_rows(conv, conv_scales, stash_conv, stash_conv_scales, track_conv, track_conv_scales, layer, slot,
                    srow, nodes, use_nodes, seq_len, a, tracked, entry, write_back, conv8, esz, first_warp,
                    (cuda.gridDim.x - heads) * warps)  # fmt: skip
        return
    amax_buf = cuda.shared.array(COMMIT_THREADS, np.float32)
    flag_buf = cuda.shared.array(COMMIT_THREADS, np.int32)
    delta = cuda.shared.array(REPLAY_MAX_N, np.float32)
    values = cuda.local.array(_PER_LANE, np.float32)
    groups, size = rec.shape[2], rec.shape[3]
    dim = groups // heads
    i = cuda.blockIdx.x
    j = i // (heads // stash_k.shape[2])
    for t in range(steps):
        from_slot = write_back != 0 or t == 0  # where the state before step t is
        row = _step(nodes, use_nodes, srow, seq_len, t)
        decay, strength = stash_g[layer, row, i], stash_beta[layer, row, i]
        for e in range(tid, size, threads):  # pass A: a thread a column
            pred = np.float32(0.0)
            for d in range(dim):
                s = _gdn_state(rec, rec_scales, track_rec, track_rec_scales, from_slot, layer, slot, entry,
                               i * dim + d, e, rec_code)  # fmt: skip
                pred = np.float32(pred + np.float32(np.float32(s * decay) * stash_k[layer, row, j, d]))
            delta[e] = np.float32(strength * np.float32(stash_v[layer, row, i, e] - pred))
        cuda.syncthreads()
        for k in range(-(-dim // warps)):  # pass B: a warp a row (the same count in every warp)
            d = warp + k * warps
            live = d < dim
            g = i * dim + d
            amax = np.float32(0.0)
            finite = True
            if live:
                key = stash_k[layer, row, j, d]
                for q in range(_PER_LANE):
                    n = lane + 32 * q
                    if n < size:
                        s = _gdn_state(rec, rec_scales, track_rec, track_rec_scales, from_slot, layer, slot, entry, g,
                                       n, rec_code)  # fmt: skip
                        x = np.float32(np.float32(s * decay) + np.float32(key * delta[n]))
                        if feedback:
                            fed = rec_residual[layer, slot, g, n] if from_slot else track_residual[layer, entry, g, n]
                            x = np.float32(x + _bf16(fed))
                        values[q] = x
                        amax, finite = amax_step(x, amax, finite)
            amax, finite = _warp_amax(amax, finite, amax_buf, flag_buf)  # every lane has read the old scale
            if not live:
                continue
            scale = group_scale(amax, finite, QMAX[rec_code])
            for q in range(_PER_LANE):
                n = lane + 32 * q
                if n < size:
                    x = values[q]
                    byte = _stored_byte(x, scale, rec_code, stochastic, g * size + n, start + t + 1, layer, seed_lo,
                                        seed_hi)  # fmt: skip
                    fed_bits = np.uint32(0)
                    if feedback:
                        fed_bits = float32_bits(_residual_of(x, byte, scale, rec_code)) >> np.uint32(16)
                    if write_back:
                        rec[layer, slot, g, n] = byte
                        if feedback:
                            rec_residual[layer, slot, g, n] = fed_bits
                    if t == tracked or not write_back:  # a read computes in the entry
                        track_rec[layer, entry, g, n] = byte
                        if feedback:
                            track_residual[layer, entry, g, n] = fed_bits
            if lane == 0:
                if write_back:
                    rec_scales[layer, slot, g] = scale
                if t == tracked or not write_back:
                    track_rec_scales[layer, entry, g] = scale
        cuda.syncthreads()  # every row stored before the next step's pass A reads the columns
