"""CUDA device functions of the 8-bit states: a group's scale, quantising and dequantising one element.

They repeat [`mamba_cache.precision.quant8`][mamba_cache.precision.quant8] on scalars, so the GPU stores the
reference's bits:

- ``group_scale(amax, finite, qmax)``: ``max(amax / qmax, 2**-126)`` (an IEEE float32 division: Numba
  emits ``div.rn.f32`` without fastmath), NaN for a group that is not finite;
- ``quantise_code(x, scale, code, stochastic, random)``: the stored byte (uint8 pattern) of
  ``x / scale``;
- ``dequantise_code(byte, scale, code)``: ``stored * scale`` in float32.

``code`` names the dtype: ``CODE_E4M3`` (float8_e4m3fn), ``CODE_E5M2`` (float8_e5m2), ``CODE_INT8``.

float8 reuses the 16-bit conversion [`convert_bits`][mamba_cache.precision.kernels.convert_bits] with no
saturating variant of its own: float8_e5m2 is an IEEE format, so its code is converted directly and
capped at 0x7B; float8_e4m3fn keeps finite values at exponent field 15, where the IEEE (4, 3) format has
its infinities, so the quotient is converted as ``q * 2**-8`` to the (5, 3) format (bias 15): its
exponent field minus 8, the same target exponent field ``e_d = u + 7``, the same kept bits and the
same rounding, and a magnitude code below that format's infinity, capped at 0x7E. A quotient whose
float32 exponent field is 8 or less (``|q| < 2**-118``) drops more than 62 bits in the reference,
which gives zero; it gives zero here too. int8 rounds in float64, where ``q`` (24 significant bits)
and ``q + u`` are exact or cannot cross an integer by rounding.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..core.device import SIMULATOR
from ..core.rows import accepted_steps, last_tree_node, row_slot, tracked_step
from .kernels import convert_bits, float32_bits, float32_from_bits, philox4x32_10

#: The dtype codes of the device functions, in `QUANT8_DTYPE_NAMES` order.
CODE_E4M3, CODE_E5M2, CODE_INT8 = 0, 1, 2
#: qmax by code.
QMAX = (448.0, 57344.0, 127.0)
#: The NaN byte of each dtype (int8's -128 as uint8).
NAN_BYTE = (0x7F, 0x7E, 0x80)


def dtype_code(dtype) -> int:
    """The device code of an 8-bit dtype (``numpy.dtype`` or name)."""
    from .quant8 import QUANT8_DTYPE_NAMES

    return QUANT8_DTYPE_NAMES.index(np.dtype(dtype).name)


@cuda.jit(device=True, inline="always")
def group_scale(amax, finite, qmax):
    """``max(amax / qmax, 2**-126)`` as float32; NaN when ``finite`` is False."""
    if not finite:
        return np.float32(math.nan)
    scale = np.float32(amax) / np.float32(qmax)
    floor = np.float32(2.0**-126)
    return scale if scale > floor else floor


@cuda.jit(device=True, inline="always")
def amax_step(x, amax, finite):
    """``(amax, finite)`` after one more element ``x`` of a group: the running largest finite magnitude."""
    if x != x or abs(x) == math.inf:
        return amax, False
    return (abs(x) if abs(x) > amax else amax), finite


@cuda.jit(device=True)
def quantise_code(x, scale, code, stochastic, random):
    """The stored byte of float32 ``x`` at ``scale`` (uint8 pattern, as int64); see the module docstring.

    Args:
        x: the float32 value.
        scale: the group's float32 scale (NaN: the NaN byte).
        code: ``CODE_E4M3``, ``CODE_E5M2`` or ``CODE_INT8``.
        stochastic: 1 to round stochastically with ``random``, 0 for nearest even.
        random: the element's 32-bit random word (uint64).
    """
    q = np.float32(np.float32(x) / np.float32(scale))
    if q != q or scale != scale:
        return np.int64(0x7F if code == CODE_E4M3 else (0x7E if code == CODE_E5M2 else 0x80))
    if code == CODE_INT8:
        wide = np.float64(q)
        if stochastic:
            rounded = math.floor(wide + np.float64(np.uint64(random) >> np.uint64(8)) * 2.0**-24)
        else:
            low = math.floor(wide)
            rest = wide - low
            rounded = low + 1.0 if rest > 0.5 or (rest == 0.5 and low % 2.0 != 0.0) else low
        rounded = 127.0 if rounded > 127.0 else (-127.0 if rounded < -127.0 else rounded)
        return np.int64(rounded) & np.int64(0xFF)
    bits = np.uint64(float32_bits(q))
    sign = (bits >> np.uint64(31)) & np.uint64(1)
    mag = bits & np.uint64(0x7FFFFFFF)
    if code == CODE_E5M2:
        result = convert_bits(mag, 8, 23, 5, 2, stochastic, random)
        cap = np.uint64(0x7B)
    else:
        result = np.uint64(0)
        if (mag >> np.uint64(23)) > np.uint64(8):
            result = convert_bits(mag - np.uint64(8 << 23), 8, 23, 5, 3, stochastic, random)
        cap = np.uint64(0x7E)
    if result > cap:
        result = cap
    return np.int64(result | (sign << np.uint64(7)))


@cuda.jit(device=True)
def dequantise_code(byte, scale, code):
    """``stored * scale`` in float32 of the stored byte ``byte`` (0..255)."""
    b = np.int64(byte) & np.int64(0xFF)
    if code == CODE_INT8:
        if b == 0x80:
            return np.float32(math.nan)
        value = np.float32(b - 256 if b > 127 else b)
        return np.float32(value * np.float32(scale))
    if code == CODE_E5M2:  # IEEE: widen exactly to float32
        wide = convert_bits(np.uint64(b), 5, 2, 8, 23, False, np.uint64(0))
    else:  # e4m3fn through (5, 3) and an exponent 8 lower; 0x7F / 0xFF are NaN
        if (b & 0x7F) == 0x7F:
            return np.float32(math.nan)
        wide = convert_bits(np.uint64(b & 0x7F), 5, 3, 8, 23, False, np.uint64(0))
        if (wide & np.uint64(0x7FFFFFFF)) != 0:
            wide = wide + np.uint64(8 << 23)
        wide = wide | (np.uint64(b >> 7) << np.uint64(31))
    return np.float32(float32_from_bits(wide) * np.float32(scale))


@cuda.jit(cache=False)
def quantise_rows(values, scales, src, random, code, stochastic):
    """Quantise rows as groups: ``values[r, :], scales[r] = quantise(src[r, :])``; a test and benchmark helper.

    Args:
        values (DeviceNDArray): ``[rows, n]`` uint8 stored bytes (written).
        scales (DeviceNDArray): ``[rows]`` float32 scales (written).
        src (DeviceNDArray): ``[rows, n]`` float32 values.
        random (DeviceNDArray): ``[rows, n]`` uint32 random words (read when ``stochastic``).
        code (int): the dtype code.
        stochastic (int): 1 for stochastic rounding.

    Grid ``(ceil(rows / threads),)``, one thread a row (a group).
    """
    row = cuda.grid(1)
    if row >= src.shape[0]:
        return
    amax = np.float32(0.0)
    finite = True
    for i in range(src.shape[1]):
        x = src[row, i]
        amax, finite = amax_step(x, amax, finite)
    scale = group_scale(amax, finite, QMAX[code])
    scales[row] = scale
    for i in range(src.shape[1]):
        values[row, i] = quantise_code(src[row, i], scale, code, stochastic, np.uint64(random[row, i]))


# ---------------------------------------------------------------- the scatter / tree commit into 8-bit pools

#: What a commit does with one state kind (``commit8``'s ``rec_mode`` / ``conv_mode``).
COMMIT_BYTES, COMMIT_COPY8, COMMIT_QUANTISE = 0, 1, 2
#: How ``commit8`` reads a wider per-step pool (``rec_src`` / ``conv_src``).
SRC_FLOAT32, SRC_FLOAT16, SRC_BFLOAT16, SRC_FLOAT64 = 0, 1, 2, 3


@cuda.jit(device=True, inline="always")
def wide_value(raw, src):
    """A per-step element as float32: float32 / float16 exactly, bfloat16 (uint16 bits) exactly, float64 to nearest."""
    if src == SRC_BFLOAT16:
        return float32_from_bits(np.uint64(raw) << np.uint64(16))
    return np.float32(raw)


@cuda.jit(device=True, inline="always")
def philox_word(element, position, layer, kind, seed_lo, seed_hi):
    """The random word of ``element`` (within its slot) for a state after ``position`` tokens (the reference's)."""
    r0, r1, r2, r3 = philox4x32_10(
        (element // 4) & 0xFFFFFFFF, position & 0xFFFFFFFF, layer & 0xFFFFFFFF, kind, seed_lo, seed_hi
    )
    lane = element % 4
    return r0 if lane == 0 else (r1 if lane == 1 else (r2 if lane == 2 else r3))


@cuda.jit(device=True)
def _commit_row(b, nodes, accept, state_indices, use_indices, use_nodes, seq_len, max_accept, slots_total):
    """(slot, per-step step, tokens taken in) of row ``b``, slot -1 when the row commits nothing.

    The commit row rule of `mamba_cache.core.rows` (scatter: step ``a - 1`` with ``1 <= a <= max_accept``;
    tree: the last non-negative accepted node, ``depth + 1`` tokens).
    """
    if use_nodes:
        node, depth = last_tree_node(nodes, accept, b, seq_len)
        step, consumed = np.int64(node), np.int64(depth + 1)
    else:
        a = np.int64(accepted_steps(accept, b, max_accept))
        step, consumed = a - 1, a
    slot = np.int64(row_slot(state_indices, use_indices, b, slots_total))
    if step < 0 or slot < 0:
        return -1, 0, 0
    return slot, step, consumed


#: Threads per block of ``commit8`` (a multiple of 32: a warp a group); one warp under the simulator,
#: which runs every thread in Python (the same code, a quarter of the threads), as the replay kernels do.
COMMIT_THREADS = 32 if SIMULATOR else 128


@cuda.jit(device=True, inline="always")
def _warp_amax(amax, finite, amax_buf, flag_buf):
    """The largest ``amax`` of the thread's warp and whether ``finite`` holds for every lane.

    Through shared memory and ``syncthreads`` (the simulator has no warp shuffles): every thread
    of the block calls it, the same number of times.
    """
    tid = cuda.threadIdx.x
    amax_buf[tid] = amax
    flag_buf[tid] = 1 if finite else 0
    cuda.syncthreads()
    base = tid - tid % 32
    best = np.float32(0.0)
    ok = 1
    for i in range(32):
        value = amax_buf[base + i]
        best = value if value > best else best
        ok = ok if flag_buf[base + i] == 1 else 0
    cuda.syncthreads()  # the buffers are free for the next group
    return best, ok == 1


@cuda.jit(device=True, inline="always")
def _fed_value(inter, residual, layer, src_row, slot, g, n, src, feedback):
    """Per-step element ``(g, n)`` as float32, plus the slot's residual under error feedback."""
    x = wide_value(inter[layer, src_row, g, n], src)
    if feedback:
        x = np.float32(x + float32_from_bits(np.uint64(residual[layer, slot, g, n]) << np.uint64(16)))
    return x


@cuda.jit(cache=False)
def commit8(
    # pools: main [L, B, G, n] / per-step [L, B*S, G, n] as stored; scales [L, B, G] / [L, B*S, G]
    rec, rec_scales, rec_residual, inter_rec, inter_rec_scales,
    conv, conv_scales, inter_conv, inter_conv_scales,
    # where the committed state goes: the main pools again, or (tracking) a prefix store's entries [L, P, ...]
    dst_rec, dst_rec_scales, dst_residual, dst_conv, dst_conv_scales,
    # the rows: accept_lengths [active], node_ids [active, M], state_indices [active], positions [active],
    # track_entries / track_steps [active]
    accept, nodes, state_indices, positions, track_entries, track_steps,
    # scalars
    use_indices, use_nodes, use_positions, tracking, seq_len, max_accept,
    rec_mode, rec_code, rec_src, conv_mode, conv_code, conv_src, feedback, stochastic, seed_lo, seed_hi,
):  # fmt: skip
    """The scatter / tree commit of both kinds when one is 8-bit, values and scales in one launch.

    Layouts (``G`` groups of ``n`` elements a slot, ``[L, rows, G, n]``; conv windows as
    ``[L, rows, C, K]``):

        recurrent  rec [L, B, H*D, N]   rec_scales [L, B, H*D]   rec_residual [L, B, H*D, N] (uint16)
        conv       conv [L, B, C, K]    conv_scales [L, B, ceil(C/64), K]

    Row ``b`` commits as the NumPy reference's ``_commit8`` does: an 8-bit per-step state copies its
    bytes and scales (``COMMIT_COPY8``); a wider one is quantised (``COMMIT_QUANTISE``); a kind that
    is not 8-bit and keeps its dtype copies bytes (``COMMIT_BYTES``, pools viewed
    ``[L, rows, 1, bytes]``). The state goes to the ``dst_*`` arrays: the main pools at the slot, or
    with ``tracking`` (a scatter's tracking, launched before its commit) row ``track_entries[b]`` of a
    prefix store's entries, the state a commit of ``t + 1 = track_steps[b] + 1`` tokens would give the
    slot (its residual and old window read from the slot), for ``0 <= t < min(a, V)``, the entry in
    range and the slot in ``[0, B)``.

    Grid ``(x, active, L)``, block ``(threads,)`` (a multiple of 32). One warp a recurrent group or a
    conv block of 64 channels, lane ``l`` taking elements ``l, l + 32, ...`` (coalesced), the group's
    amax reduced across the warp through shared memory; a conv block's window is shifted column by column in
    increasing order, each lane its own channels, so a column is read before it is overwritten.
    Warp ``w`` of the x dimension takes groups / blocks ``w, w + W, ...`` (``W`` warps along x);
    ``COMMIT_BYTES`` spreads bytes over every thread.

        slot row:  group 0 [n0 n1 ... n31 | n32 ... n63 | ...]  group 1 [...]  ...
                   warp 0  lane 0 .. 31   | lane 0 .. 31        warp 1
    """
    b, layer = cuda.blockIdx.y, cuda.blockIdx.z
    slot, step, consumed = _commit_row(
        b, nodes, accept, state_indices, use_indices, use_nodes, seq_len, max_accept, rec.shape[1]
    )
    drow = slot
    if tracking:  # the state after step t of the row, into its entry (the row rule of core.rows)
        t, entry = tracked_step(track_steps, track_entries, b, accept[b], seq_len, dst_rec.shape[1])
        if t < 0:
            return
        slot = np.int64(row_slot(state_indices, use_indices, b, rec.shape[1]))
        step, consumed, drow = np.int64(t), np.int64(t + 1), np.int64(entry)
    if slot < 0:
        return
    src_row = b * seq_len + step
    position = np.int64(positions[b]) + consumed if use_positions else consumed
    lane = cuda.threadIdx.x % 32
    warps = cuda.blockDim.x // 32
    first_warp = cuda.blockIdx.x * warps + cuda.threadIdx.x // 32
    all_warps = cuda.gridDim.x * warps
    start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    stride = cuda.gridDim.x * cuda.blockDim.x
    # recurrent: a group is (h, d) over N
    groups, size = rec.shape[2], rec.shape[3]
    if rec_mode == COMMIT_BYTES:
        for i in range(start, size, stride):
            dst_rec[layer, drow, 0, i] = inter_rec[layer, src_row, 0, i]
    amax_buf = cuda.shared.array(COMMIT_THREADS, np.float32)
    flag_buf = cuda.shared.array(COMMIT_THREADS, np.int32)
    rounds = -(-groups // all_warps) if rec_mode != COMMIT_BYTES else 0  # the same count in every warp
    for k in range(rounds):
        g = first_warp + k * all_warps
        live = g < groups
        if rec_mode == COMMIT_COPY8:
            if live:
                for n in range(lane, size, 32):
                    dst_rec[layer, drow, g, n] = inter_rec[layer, src_row, g, n]
                if lane == 0:
                    dst_rec_scales[layer, drow, g] = inter_rec_scales[layer, src_row, g]
            continue
        amax = np.float32(0.0)
        finite = True
        if live:
            for n in range(lane, size, 32):
                x = _fed_value(inter_rec, rec_residual, layer, src_row, slot, g, n, rec_src, feedback)
                amax, finite = amax_step(x, amax, finite)
        amax, finite = _warp_amax(amax, finite, amax_buf, flag_buf)
        if not live:
            continue
        scale = group_scale(amax, finite, QMAX[rec_code])
        for n in range(lane, size, 32):
            x = _fed_value(inter_rec, rec_residual, layer, src_row, slot, g, n, rec_src, feedback)
            r = np.uint64(0)
            if stochastic:
                r = philox_word(g * size + n, position, layer, 0, seed_lo, seed_hi)
            byte = quantise_code(x, scale, rec_code, stochastic, r)
            dst_rec[layer, drow, g, n] = byte
            if feedback:
                error = np.float32(x - dequantise_code(byte, scale, rec_code))
                bits = np.uint64(0) if error != error else convert_bits(float32_bits(error), 8, 23, 8, 7, False, 0)
                dst_residual[layer, drow, g, n] = bits
        if lane == 0:
            dst_rec_scales[layer, drow, g] = scale
    # conv: a warp a block of 64 channels (two a lane), all K columns in increasing order
    channels, width = conv.shape[2], conv.shape[3]
    if conv_mode == COMMIT_BYTES:
        for i in range(start, width, stride):
            dst_conv[layer, drow, 0, i] = inter_conv[layer, src_row, 0, i]
        return
    shift = consumed
    blocks = conv_scales.shape[2]
    for k in range(-(-blocks // all_warps)):  # the same count in every warp
        block = first_warp + k * all_warps
        live = block < blocks
        first = block * 64
        last = first + 64 if first + 64 < channels else channels
        for j in range(width):
            if conv_mode == COMMIT_COPY8 or j < width - shift:  # copied from the per-step window, or moved
                copy8 = conv_mode == COMMIT_COPY8
                if live:  # each lane its own channels: column j + s is read before this lane overwrites it
                    for c in range(first + lane, last, 32):
                        dst_conv[layer, drow, c, j] = (
                            inter_conv[layer, src_row, c, j] if copy8 else conv[layer, slot, c, j + shift]
                        )
                    if lane == 0:
                        moved = (
                            inter_conv_scales[layer, src_row, block, j]
                            if copy8
                            else conv_scales[layer, slot, block, j + shift]
                        )
                        dst_conv_scales[layer, drow, block, j] = moved
                continue
            amax = np.float32(0.0)  # a new column, quantised with the words of the token it came with
            finite = True
            if live:
                for c in range(first + lane, last, 32):
                    x = wide_value(inter_conv[layer, src_row, c, j], conv_src)
                    amax, finite = amax_step(x, amax, finite)
            amax, finite = _warp_amax(amax, finite, amax_buf, flag_buf)
            if not live:
                continue
            scale = group_scale(amax, finite, QMAX[conv_code])
            entered = position - (width - 1 - j)
            for c in range(first + lane, last, 32):
                x = wide_value(inter_conv[layer, src_row, c, j], conv_src)
                r = np.uint64(0)
                if stochastic:
                    r = philox_word(c * width + width - 1, entered, layer, 1, seed_lo, seed_hi)
                dst_conv[layer, drow, c, j] = quantise_code(x, scale, conv_code, stochastic, r)
            if lane == 0:
                dst_conv_scales[layer, drow, block, j] = scale
