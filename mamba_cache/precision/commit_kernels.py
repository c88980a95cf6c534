"""The converting commits' kernels, specialised per dtype pair and built for bandwidth.

A converting commit (main pool dtype != per-step dtype) moves each committed slot once: read the per-step state, convert
each element, write the main slot (and, for a tracked commit, a prefix-store entry). Rounding is the reference's
([`mamba_cache.precision.reference`][mamba_cache.precision.reference]) bit for bit; what changes here is how the bytes
move.

A slot whose element count is a multiple of 4 is seen as uint64 words (the fast, "wide" path);
each thread owns whole groups of 4 consecutive elements (one Philox4x32-10 call gives a group's 4
random words, exactly the reference's keying: counter word 0 is ``element // 4``):

    element size   words per group   groups per thread   u64 loads in flight per thread
    2 (f16, bf16)        1                  8                         8
    4 (f32)              2                  4 (8: to bf16 or          8 (16)
                                              f16, stochastic)
    8 (f64)              4                  2                         8

    slot [E elements] = [E/4 groups]:
        | g0 g1 .. gT-1 | gT .. g2T-1 | ... (per rounds)  | <- chunk 0 | chunk 1 ...
    thread t of chunk c owns groups  (c * per + i) * threads + t,  i = 0 .. per-1

All of a thread's loads are issued before its first conversion (a local array the compiler keeps
in registers: the loops are unrolled with constant bounds); consecutive threads read consecutive
groups, so a warp's loads cover contiguous 256- or 512-byte spans. The element conversions are
specialised at build time (closure constants, one compiled kernel per dtype pair of the config):

    float32 -> bfloat16   nearest: (x + 0x7FFF + ((x >> 16) & 1)) >> 16, NaN kept a quiet NaN;
                          stochastic: (x + (r >> 16)) >> 16
    bfloat16 -> float32   x << 16 (NaN: quiet bit set)
    float32 -> float16    nearest: the hardware's cvt.rn.f16.f32 (a NaN selected to the reference's);
                          stochastic: x + (r >> 19) on the float32 bits, truncated by the
                          hardware's cvt.rz.f16.f32, for |x| < 2**-126 or 2**-14 <= |x| < 65504;
                          a group holding any other value (a subnormal result, |x| >= 65504, an
                          infinity, a NaN) is flagged and redone after the group loop with the
                          integer steps (one loop over the flagged groups: the group loop stays
                          straight-line code, one block per group, no branch inside)
    float16 -> float32    the hardware's cvt.f32.f16 (exact; a NaN selected to the reference's)
    float16 <-> bfloat16  through float32 (exact), then one rounding as above
    any other pair        the general integer steps (`mamba_cache.precision.kernels.convert_bits`)

Stochastic rounding: the Philox work a thread's groups share (round keys, the two products that
do not depend on the group) is done once per thread (`philox_setup`), leaving 18 products
per group (`philox_group`). A widening pair (2 -> 4 bytes) moves pairs of elements instead
(a uint32 load, a uint64 store: `_widening_chunk`), so a warp's stores are contiguous.

A kind whose slot is not a multiple of 4 elements (its slots are then not 8-byte aligned) takes the
element path (`mamba_cache.precision.kernels._convert_chunk`), in the same launch: each kind
picks its own path. Equal dtypes copy words. The grid is ``(chunks_a + chunks_b, rows, L)``: one
launch covers every layer and both kinds, with no allocation and no synchronisation.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda

from ..core.device import SIMULATOR
from ..core.launch import slot_launch_shape
from ..core.rows import accepted_steps, is_padding, last_tree_node, row_slot, tracked_step
from . import kernels
from .kernels import (
    MODE_COPY,
    MODE_STOCHASTIC,
    convert_bits,
    float32_bits,
    float32_from_bits,
    half_bits_to_float32,
    half_rn_bits,
    half_rz_bits,
)
from .reference import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

#: uint64 loads each thread issues before converting (the groups per thread follow from it).
WORDS_IN_FLIGHT = 8

#: The (src_e, src_m, dst_e, dst_m) pairs with a specialised conversion; the others (float64 to or
#: from anything) run the general uint64 steps, whose larger code keeps a thread to a quarter of
#: the loads in flight (with more, the compiler stops unrolling and the buffer goes to local memory).
_SPECIALISED = ((8, 23, 8, 7), (8, 7, 8, 23), (8, 23, 5, 10), (5, 10, 8, 23), (5, 10, 8, 7), (8, 7, 5, 10))

#: The stochastic pairs that convert twice the groups per thread (float32 -> bfloat16 / float16).
_DOUBLED = ((8, 23, 8, 7), (8, 23, 5, 10))

_U32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(0xFFFF)


def spec_of(mode: int, src_format: tuple, dst_format: tuple, src_size: int, dst_size: int, elems: int) -> tuple:
    """The hashable description of one kind's commit: ``(mode, se, sm, de, dm, src_size, dst_size, wide)``."""
    return (int(mode), *map(int, src_format), *map(int, dst_format), int(src_size), int(dst_size), elems % 4 == 0)


def groups_per_thread(spec: tuple) -> int:
    """Groups of 4 elements one thread converts per chunk (the element path: ``kernels.GROUPS_PER_THREAD``)."""
    if not spec[7]:
        return kernels.GROUPS_PER_THREAD
    words = WORDS_IN_FLIGHT if spec[0] == MODE_COPY or spec[1:5] in _SPECIALISED else WORDS_IN_FLIGHT // 4
    if spec[0] == MODE_STOCHASTIC and spec[1:5] in _DOUBLED:
        # float32 -> bfloat16 / float16 stochastic: twice the groups per thread, so the per-thread
        # setup (row, addresses, Philox keys) is shared by 32 elements
        words *= 2
    return max(1, words // (spec[5] // 2))


def launch_shape(specs: tuple, elems: tuple) -> tuple[tuple[int, ...], int]:
    """``((chunks per kind), threads)``: the x blocks covering one slot of each kind, in one launch."""
    return slot_launch_shape([-(-e // 4) for e in elems], [groups_per_thread(s) for s in specs])


# ---------------------------------------------------------------- Philox4x32-10 on 32-bit words


if SIMULATOR:  # the simulator has no libdevice: the high word of the exact 64-bit product

    @cuda.jit(device=True, inline="always")
    def _umulhi(a, m):
        return np.uint32((np.uint64(np.uint32(a)) * np.uint64(np.uint32(m))) >> np.uint64(32))

else:  # PTX mul.hi.u32 on 32-bit operands; ptxas pairs it with the low product into one IMAD.WIDE.U32
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def _umulhi(a, m):
        return np.uint32(libdevice.umulhi(np.uint32(a), np.uint32(m)))


@cuda.jit(device=True, inline="always")
def _mulhilo32(a, m):
    # the high and low words of a 32 x 32 -> 64-bit product, both computed on 32-bit operands (a
    # product of 64-bit-typed values compiles to a 64-bit multiply plus a carry add on the GPU)
    return _umulhi(a, m), np.uint32((np.uint64(np.uint32(a)) * np.uint64(np.uint32(m))) & _U32)


@cuda.jit(device=True, inline="always")
def _round_key(seed, weyl, round_):
    # the key word of round ``round_``: seed + round_ * weyl modulo 2**32
    return np.uint32((np.uint64(seed) + np.uint64(round_) * np.uint64(weyl)) & _U32)


@cuda.jit(device=True, inline="always")
def philox_setup(c1, c2, c3, k0, k1):
    """What Philox4x32-10 of every counter ``(g, c1, c2, c3)`` shares, for `philox_group`.

    Only counter word 0 (the group) differs between a thread's groups, so the product of round 0
    that reads word 2, the product of round 1 that reads round 0's word 0, and every round key
    are the same for all of them: computed once per thread (before the group loop) instead of
    once per group. Returns a tuple of uint32: ``(x0, x1, hi, lo, k1_0 ^ c3, k0_1, k1_1, k0_2, k1_2,
    ..., k0_9, k1_9)`` where ``x0, x1`` are words 0 and 1 after round 0 and ``hi, lo`` round 1's
    product of ``x0``.
    """
    hi, lo = _mulhilo32(np.uint32(c2), PHILOX_M1)
    x0 = np.uint32(hi ^ np.uint32(c1) ^ np.uint32(k0))
    hi1, lo1 = _mulhilo32(x0, PHILOX_M0)
    return (
        x0,
        lo,
        hi1,
        lo1,
        np.uint32(np.uint32(k1) ^ np.uint32(c3)),
        _round_key(k0, PHILOX_W0, 1),
        _round_key(k1, PHILOX_W1, 1),
        _round_key(k0, PHILOX_W0, 2),
        _round_key(k1, PHILOX_W1, 2),
        _round_key(k0, PHILOX_W0, 3),
        _round_key(k1, PHILOX_W1, 3),
        _round_key(k0, PHILOX_W0, 4),
        _round_key(k1, PHILOX_W1, 4),
        _round_key(k0, PHILOX_W0, 5),
        _round_key(k1, PHILOX_W1, 5),
        _round_key(k0, PHILOX_W0, 6),
        _round_key(k1, PHILOX_W1, 6),
        _round_key(k0, PHILOX_W0, 7),
        _round_key(k1, PHILOX_W1, 7),
        _round_key(k0, PHILOX_W0, 8),
        _round_key(k1, PHILOX_W1, 8),
        _round_key(k0, PHILOX_W0, 9),
        _round_key(k1, PHILOX_W1, 9),
    )


@cuda.jit(device=True, inline="always")
def philox_group(g, st):
    """Philox4x32-10 of counter ``(g, c1, c2, c3)`` given ``st = philox_setup(c1, c2, c3, k0, k1)``.

    The four words of Philox4x32-10 of that counter under key ``(k0, k1)`` (the reference's
    [`mamba_cache.precision.reference.philox4x32_10`][mamba_cache.precision.reference.philox4x32_10]): 18 products (two
    of the 20 are in ``st``) and 19 three-way XORs per call, no key arithmetic.
    """
    # round 0: only the product of word 0 (the group) is new
    hi0, lo0 = _mulhilo32(np.uint32(g), PHILOX_M0)
    x0, x1, x2, x3 = st[0], st[1], np.uint32(hi0 ^ st[4]), lo0
    # round 1: the product of word 0 is st[2], st[3]
    hi1, lo1 = _mulhilo32(x2, PHILOX_M1)
    x0, x1, x2, x3 = np.uint32(hi1 ^ x1 ^ st[5]), lo1, np.uint32(st[2] ^ x3 ^ st[6]), st[3]
    # rounds 2 .. 9, written out: the round keys are tuple items at constant indices
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[7], st[8])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[9], st[10])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[11], st[12])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[13], st[14])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[15], st[16])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[17], st[18])
    x0, x1, x2, x3 = _philox_round(x0, x1, x2, x3, st[19], st[20])
    return _philox_round(x0, x1, x2, x3, st[21], st[22])


@cuda.jit(device=True, inline="always")
def _philox_round(x0, x1, x2, x3, key0, key1):
    hi0, lo0 = _mulhilo32(x0, PHILOX_M0)
    hi1, lo1 = _mulhilo32(x2, PHILOX_M1)
    return np.uint32(hi1 ^ x1 ^ key0), lo1, np.uint32(hi0 ^ x3 ^ key1), lo0


@cuda.jit(device=True, inline="always")
def _f32_to_f16_rn(x):
    # float32 bits -> float16 bits (uint32), round to nearest even in hardware: the reference's bits
    # for every non-NaN input (subnormal results and overflow to infinity included); a NaN is the
    # reference's quiet NaN with the top payload bits (a select, not a branch)
    x32 = np.uint32(x)
    f = float32_from_bits(x32)
    h = half_rn_bits(f)
    if f != f:
        h = np.uint32(
            ((x32 >> np.uint32(16)) & np.uint32(0x8000))
            | np.uint32(0x7E00)
            | ((x32 >> np.uint32(13)) & np.uint32(0x3FF))
        )
    return h


@cuda.jit(device=True, inline="always")
def _f16_to_f32_hw(x):
    # float16 bits (the low 16 of x) -> float32 bits, exact in hardware; a NaN the reference's quiet
    # NaN with the payload (a select, not a branch)
    x16 = np.uint32(np.uint32(x) & np.uint32(0xFFFF))
    f = half_bits_to_float32(x16)
    w = float32_bits(f)
    if f != f:
        # sign | 0x7FC00000 | man << 13: (x16 << 16) shifted right by 3 as int32 keeps the sign at
        # bit 31 and puts the payload at 22 .. 13; the OR sets the rest
        w = np.uint32(np.uint32(np.int32(x16 << np.uint32(16)) >> np.int32(3)) | np.uint32(0x7FC00000))
    return w


# ---------------------------------------------------------------- element conversions (uint64 in, uint64 out)


@cuda.jit(device=True, inline="always")
def _f32_to_bf16_nearest(x, r):
    x32 = np.uint32(x & _U32)
    top = np.uint32((x32 >> np.uint32(16)) & np.uint32(0x8000))
    mag = np.uint32(x32 & np.uint32(0x7FFFFFFF))
    if mag > np.uint32(0x7F800000):  # NaN: the quiet NaN with the top payload bits
        return np.uint64(top | np.uint32(0x7FC0) | (mag >> np.uint32(16)))
    odd = np.uint32((mag >> np.uint32(16)) & np.uint32(1))
    return np.uint64(top | ((mag + np.uint32(0x7FFF) + odd) >> np.uint32(16)))


@cuda.jit(device=True, inline="always")
def _f32_to_bf16_stochastic(x, r):
    x32 = np.uint32(x & _U32)
    top = np.uint32((x32 >> np.uint32(16)) & np.uint32(0x8000))
    mag = np.uint32(x32 & np.uint32(0x7FFFFFFF))
    if mag > np.uint32(0x7F800000):
        return np.uint64(top | np.uint32(0x7FC0) | (mag >> np.uint32(16)))
    return np.uint64(top | ((mag + (np.uint32(r) >> np.uint32(16))) >> np.uint32(16)))


@cuda.jit(device=True, inline="always")
def _bf16_to_f32(x, r):
    x16 = np.uint32(x & _U16)
    wide = np.uint32(x16 << np.uint32(16))
    if (x16 & np.uint32(0x7FFF)) > np.uint32(0x7F80):  # NaN: set the quiet bit
        wide = np.uint32(wide | np.uint32(0x00400000))
    return np.uint64(wide)


@cuda.jit(device=True, inline="always")
def _f32_to_f16_stochastic(x, r):
    # float32 bits -> float16 bits rounded stochastically with the random word r, every case in
    # integer steps (round to nearest even goes through the hardware: _f32_to_f16_rn)
    x32 = np.uint32(x & _U32)
    top = np.uint32((x32 >> np.uint32(16)) & np.uint32(0x8000))
    exp = np.uint32((x32 >> np.uint32(23)) & np.uint32(0xFF))
    man = np.uint32(x32 & np.uint32(0x7FFFFF))
    if exp >= np.uint32(113):
        if exp == np.uint32(255):  # infinity, or the quiet NaN with the top payload bits
            if man == np.uint32(0):
                return np.uint64(top | np.uint32(0x7C00))
            return np.uint64(top | np.uint32(0x7E00) | (man >> np.uint32(13)))
        # a normal float16 (or overflow): rebias, round 13 bits
        a = np.uint32(
            (np.uint64(x32 & np.uint32(0x7FFFFFFF)) + np.uint64(2**32 - (112 << 23))) & _U32
        )  # mag - bias, wrapping
        q = np.uint32((a + (np.uint32(r) >> np.uint32(19))) >> np.uint32(13))
        if q > np.uint32(0x7C00):
            q = np.uint32(0x7C00)
        return np.uint64(top | q)
    if exp == np.uint32(0):  # zero or a float32 subnormal: more than 62 bits dropped, a signed zero
        return np.uint64(top)
    # a float16 subnormal (or zero): the 24-bit significand loses 126 - exp (14 .. 125) bits
    shift = np.uint32(126) - exp
    if shift > np.uint32(62):
        return np.uint64(top)
    a64 = np.uint64(man | np.uint32(0x800000))
    s64 = np.uint64(shift)
    r64 = np.uint64(np.uint32(r))
    if shift <= np.uint32(32):
        add = r64 >> (np.uint64(32) - s64)
    else:
        add = r64 << (s64 - np.uint64(32))
    return np.uint64(top) | ((a64 + add) >> s64)


@cuda.jit(device=True, inline="always")
def _f32_to_f16_nearest(x, r):
    return np.uint64(_f32_to_f16_rn(x & _U32))


@cuda.jit(device=True, inline="always")
def _f16_to_f32(x, r):
    return np.uint64(_f16_to_f32_hw(x))


@cuda.jit(device=True, inline="always")
def _f16_to_bf16(x, r):
    # float32 holds every float16 exactly, so rounding it once to bfloat16 rounds the value once
    return _f32_to_bf16_nearest(np.uint64(_f16_to_f32_hw(x)), r)


@cuda.jit(device=True, inline="always")
def _bf16_to_f16(x, r):
    # bfloat16 -> float32 is exact (NaN: the quiet bit set), then one rounding to float16 in hardware
    return np.uint64(_f32_to_f16_rn(_bf16_to_f32(x, r) & _U32))


def _converter(mode: int, se: int, sm: int, de: int, dm: int):
    """The device function ``(bits: uint64, random: uint32) -> uint64`` of one dtype pair and mode."""
    stochastic = mode == MODE_STOCHASTIC
    pair = (se, sm, de, dm)
    if pair == (8, 23, 8, 7):
        return _f32_to_bf16_stochastic if stochastic else _f32_to_bf16_nearest
    if pair == (8, 7, 8, 23):
        return _bf16_to_f32
    if pair == (8, 23, 5, 10):
        return _f32_to_f16_stochastic if stochastic else _f32_to_f16_nearest
    if pair == (5, 10, 8, 23):
        return _f16_to_f32
    if pair == (5, 10, 8, 7):
        return _f16_to_bf16
    if pair == (8, 7, 5, 10):
        return _bf16_to_f16
    flag = 1 if stochastic else 0

    @cuda.jit(device=True, inline="always")
    def general(x, r):
        return convert_bits(x, se, sm, de, dm, flag, np.uint64(r))

    return general


# ---------------------------------------------------------------- groups of 4 elements in uint64 words


@cuda.jit(device=True, inline="always")
def _unpack2(buf, o):
    w = buf[o]
    return w & _U16, (w >> np.uint64(16)) & _U16, (w >> np.uint64(32)) & _U16, w >> np.uint64(48)


@cuda.jit(device=True, inline="always")
def _unpack4(buf, o):
    w0 = buf[o]
    w1 = buf[o + 1]
    return w0 & _U32, w0 >> np.uint64(32), w1 & _U32, w1 >> np.uint64(32)


@cuda.jit(device=True, inline="always")
def _unpack8(buf, o):
    return buf[o], buf[o + 1], buf[o + 2], buf[o + 3]


@cuda.jit(device=True, inline="always")
def _store2(d, g, e0, e1, e2, e3):
    d[g] = e0 | (e1 << np.uint64(16)) | (e2 << np.uint64(32)) | (e3 << np.uint64(48))


@cuda.jit(device=True, inline="always")
def _store4(d, g, e0, e1, e2, e3):
    d[2 * g] = e0 | (e1 << np.uint64(32))
    d[2 * g + 1] = e2 | (e3 << np.uint64(32))


@cuda.jit(device=True, inline="always")
def _store8(d, g, e0, e1, e2, e3):
    d[4 * g] = e0
    d[4 * g + 1] = e1
    d[4 * g + 2] = e2
    d[4 * g + 3] = e3


@cuda.jit(device=True, inline="always")
def _bf16_high(x, add):
    # float32 bits -> a word whose high half is the bfloat16: x + add (no carry can reach the sign of
    # a finite or infinite x), a NaN the quiet NaN with the top payload bits (x | quiet bit)
    x32 = np.uint32(x)
    f = float32_from_bits(x32)
    if f != f:
        return np.uint32(x32 | np.uint32(0x00400000))
    return np.uint32(x32 + np.uint32(add))


@cuda.jit(device=True, inline="always")
def _nearest_add(x):
    # round to nearest even: 0x7FFF plus the last kept bit
    return np.uint32(np.uint32(0x7FFF) + ((np.uint32(x) >> np.uint32(16)) & np.uint32(1)))


@cuda.jit(device=True, inline="always")
def _pack_high(lo, hi):
    # the high halves of two 32-bit words as one word (``lo``'s half first)
    return np.uint32((np.uint32(lo) >> np.uint32(16)) | (np.uint32(hi) & np.uint32(0xFFFF0000)))


@cuda.jit(device=True, inline="always")
def _f32_to_bf16_group(buf, o, stochastic, r0, r1, r2, r3):
    # a group of 4 float32 (two words of the buffer) as one word of 4 bfloat16, in 32-bit arithmetic
    w0 = buf[o]
    w1 = buf[o + 1]
    x0, x1, x2, x3 = (
        np.uint32(w0 & _U32),
        np.uint32(w0 >> np.uint64(32)),
        np.uint32(w1 & _U32),
        np.uint32(w1 >> np.uint64(32)),
    )
    if stochastic:
        a0, a1 = np.uint32(r0) >> np.uint32(16), np.uint32(r1) >> np.uint32(16)
        a2, a3 = np.uint32(r2) >> np.uint32(16), np.uint32(r3) >> np.uint32(16)
    else:
        a0, a1, a2, a3 = _nearest_add(x0), _nearest_add(x1), _nearest_add(x2), _nearest_add(x3)
    lo = _pack_high(_bf16_high(x0, a0), _bf16_high(x1, a1))
    hi = _pack_high(_bf16_high(x2, a2), _bf16_high(x3, a3))
    return np.uint64(lo) | (np.uint64(hi) << np.uint64(32))


@cuda.jit(device=True, inline="always")
def _f16_stochastic_fast(x, r):
    # float32 bits -> float16 bits (uint32) rounded stochastically, and the rare-case flag. For |x| in
    # [2**-14, 65504) (a normal float16 result that cannot overflow) the reference's steps are
    # (mag - (112 << 23) + (r >> 19)) >> 13 with the sign: adding the 13 random bits to the float32
    # bit pattern and truncating it toward zero to float16 (cvt.rz) is the same, since a float16
    # normal is the float32 pattern rebiased with 13 bits dropped. For |x| < 2**-126 (zeros, float32
    # subnormals) the sum stays below 2**-125 and truncates to the signed zero the reference gives.
    # Everything else (subnormal results, |x| >= 65504, infinities, NaNs) is flagged, for the full steps
    x32 = np.uint32(x)
    # the sum wraps only for a negative NaN (flagged below); added in 64 bits and masked, since the
    # simulator's NumPy scalars warn on a wrapping 32-bit add (the GPU's code is the same either way)
    h = half_rz_bits(float32_from_bits(np.uint32((np.uint64(x32) + np.uint64(np.uint32(r) >> np.uint32(19))) & _U32)))
    f = abs(float32_from_bits(x32))
    fast = (f < np.float32(2.0**-126)) | ((f >= np.float32(2.0**-14)) & (f < np.float32(65504.0)))
    return h, not fast


@cuda.jit(device=True, inline="always")
def _f32_to_f16_group(buf, o, stochastic, r0, r1, r2, r3):
    # a group of 4 float32 (two words of the buffer) as one word of 4 float16 and a rare-case flag
    # (uint32 0 / 1), in 32-bit arithmetic, with no branch. Nearest: one hardware conversion per
    # element (NaN fixed up by a select), never rare. Stochastic: every element through
    # _f16_stochastic_fast; the flag says a subnormal result, |x| >= 65504, an infinity or a NaN may
    # have made the word wrong, for _f32_to_f16_sr_exact to redo after the group loop
    w0 = buf[o]
    w1 = buf[o + 1]
    x0, x1 = np.uint32(w0 & _U32), np.uint32(w0 >> np.uint64(32))
    x2, x3 = np.uint32(w1 & _U32), np.uint32(w1 >> np.uint64(32))
    if stochastic:
        q0, k0 = _f16_stochastic_fast(x0, r0)
        q1, k1 = _f16_stochastic_fast(x1, r1)
        q2, k2 = _f16_stochastic_fast(x2, r2)
        q3, k3 = _f16_stochastic_fast(x3, r3)
        rare = np.uint32(np.uint32(k0) | np.uint32(k1) | np.uint32(k2) | np.uint32(k3))
    else:
        q0, q1, q2, q3 = _f32_to_f16_rn(x0), _f32_to_f16_rn(x1), _f32_to_f16_rn(x2), _f32_to_f16_rn(x3)
        rare = np.uint32(0)
    lo = np.uint32(q0 | (q1 << np.uint32(16)))
    hi = np.uint32(q2 | (q3 << np.uint32(16)))
    return np.uint64(lo) | (np.uint64(hi) << np.uint64(32)), rare


@cuda.jit(device=True, inline="always")
def _f32_to_f16_sr_exact(w0, w1, r0, r1, r2, r3):
    # a group of 4 float32 (two uint64 words) as one word of 4 float16, stochastic, the full steps
    q0 = _f32_to_f16_stochastic(w0 & _U32, r0)
    q1 = _f32_to_f16_stochastic(w0 >> np.uint64(32), r1)
    q2 = _f32_to_f16_stochastic(w1 & _U32, r2)
    q3 = _f32_to_f16_stochastic(w1 >> np.uint64(32), r3)
    return q0 | (q1 << np.uint64(16)) | (q2 << np.uint64(32)) | (q3 << np.uint64(48))


_UNPACK = {2: _unpack2, 4: _unpack4, 8: _unpack8}
_STORE = {2: _store2, 4: _store4, 8: _store8}


def _wide_chunk(spec: tuple):
    """The device function converting one chunk of one slot seen as uint64 words (see the module docstring)."""
    mode, se, sm, de, dm, src_size, dst_size, _ = spec
    sw, dw = src_size // 2, dst_size // 2  # uint64 words per group of 4 elements
    per = groups_per_thread(spec)
    nbuf = per * sw
    copy = mode == MODE_COPY
    stochastic = mode == MODE_STOCHASTIC
    unpack, store = _UNPACK[src_size], _STORE[dst_size]
    conv = _bf16_to_f32 if copy else _converter(mode, se, sm, de, dm)  # unused when copying
    to_bf16 = not copy and (se, sm, de, dm) == (8, 23, 8, 7)
    to_f16 = not copy and (se, sm, de, dm) == (8, 23, 5, 10)
    f16_stochastic = to_f16 and stochastic
    if not copy and src_size == 2 and dst_size == 4:
        return _widening_chunk(spec, conv)

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        # 32-bit unsigned index arithmetic, as in _widening_chunk
        threads = np.uint32(cuda.blockDim.x)
        d = dst[layer, dst_row]
        s = src[layer, src_row]
        groups = np.uint32(d.shape[0] // dw)
        base = np.uint32(np.uint32(chunk) * np.uint32(threads * per) + np.uint32(cuda.threadIdx.x))
        buf = cuda.local.array(nbuf, np.uint64)
        if stochastic:  # the Philox work every group shares, once per thread
            st = philox_setup(np.uint64(position) & _U32, np.uint64(key_layer) & _U32, kind, seed_lo, seed_hi)
        for i in range(per):  # every load first
            g = np.uint32(base + np.uint32(i) * threads)
            if g < groups:
                for k in range(sw):
                    buf[i * sw + k] = s[g * sw + k]
        redo = np.uint32(0)  # float32 -> float16 stochastic: bit i says group i needs the full steps
        for i in range(per):
            g = np.uint32(base + np.uint32(i) * threads)
            if g < groups:
                if copy:
                    for k in range(sw):
                        d[g * sw + k] = buf[i * sw + k]
                else:
                    r0 = r1 = r2 = r3 = np.uint32(0)
                    if stochastic:
                        r0, r1, r2, r3 = philox_group(g, st)
                    if to_bf16:
                        d[g] = _f32_to_bf16_group(buf, i * sw, stochastic, r0, r1, r2, r3)
                    elif to_f16:
                        word, rare = _f32_to_f16_group(buf, i * sw, stochastic, r0, r1, r2, r3)
                        d[g] = word
                        redo = np.uint32(redo | (rare << np.uint32(i)))
                    else:
                        e0, e1, e2, e3 = unpack(buf, i * sw)
                        store(d, g, conv(e0, r0), conv(e1, r1), conv(e2, r2), conv(e3, r3))
        if f16_stochastic and redo != np.uint32(0):
            # rare: each flagged group again, from global memory, through the full steps (a loop
            # over the set bits, so its code is there once and the group loop above stays one
            # block of straight-line code)
            while redo != np.uint32(0):
                rest = np.uint32(redo & (redo - np.uint32(1)))
                g = np.uint32(base + np.uint32(31 - cuda.clz(np.uint32(redo ^ rest))) * threads)
                redo = rest
                r0, r1, r2, r3 = philox_group(g, st)
                d[g] = _f32_to_f16_sr_exact(s[2 * g], s[2 * g + 1], r0, r1, r2, r3)

    return chunk_fn


def _widening_chunk(spec: tuple, conv):
    """The chunk function of a 2-byte -> 4-byte commit (exact): 32-bit words in, 64-bit words out.

    A thread converts pairs of elements: it loads the uint32 word ``p`` of the source slot (elements
    ``2p, 2p+1``) and stores the uint64 word ``p`` of the target, so consecutive lanes read
    consecutive 4-byte words and write consecutive 8-byte words (each store instruction of a warp
    one contiguous 256-byte span; with groups of 4 a lane wrote two words 16 bytes apart). A chunk
    covers the same elements as `launch_shape` gives it (``2 * per`` pairs per thread):

    ```text
    thread t of chunk c owns pairs  (c * 2 * per + i) * threads + t,  i = 0 .. 2 * per - 1
    ```
    """
    pairs_per_thread = 2 * groups_per_thread(spec)

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        # 32-bit unsigned index arithmetic (a slot holds far fewer than 2**32 words): one wide
        # multiply-add per address instead of sign-extended 64-bit sums
        threads = np.uint32(cuda.blockDim.x)
        d = dst[layer, dst_row]
        s = src[layer, src_row].view(np.uint32)
        pairs = np.uint32(d.shape[0])
        base = np.uint32(np.uint32(chunk) * np.uint32(threads * pairs_per_thread) + np.uint32(cuda.threadIdx.x))
        buf = cuda.local.array(pairs_per_thread, np.uint32)
        for i in range(pairs_per_thread):  # every load first
            p = np.uint32(base + np.uint32(i) * threads)
            if p < pairs:
                buf[i] = s[p]
        for i in range(pairs_per_thread):
            p = np.uint32(base + np.uint32(i) * threads)
            if p < pairs:
                w = np.uint64(buf[i])
                zero = np.uint32(0)
                d[p] = conv(w & _U16, zero) | (conv(w >> np.uint64(16), zero) << np.uint64(32))

    return chunk_fn


def _element_chunk(spec: tuple):
    """The element-at-a-time chunk function (a slot not a multiple of 4 elements)."""
    mode, se, sm, de, dm = spec[:5]

    @cuda.jit(device=True, inline="always")
    def chunk_fn(dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, seed_lo, seed_hi):
        kernels._convert_chunk(
            dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, mode, se, sm, de, dm, seed_lo, seed_hi
        )

    return chunk_fn


def _chunk(spec: tuple):
    return _wide_chunk(spec) if spec[7] else _element_chunk(spec)


@functools.cache
def commit_kernels(spec_a: tuple, spec_b: tuple) -> SimpleNamespace:
    """The scatter, tree and tracked converting kernels of one pair of kind specs (see `spec_of`).

    Arrays are ``[L, rows, W]`` views of each pool: uint64 words when the kind's slot is a multiple
    of 4 elements, else unsigned integers of the element size (bfloat16 pools are uint16 already):

    ```text
    dst_a / dst_b       [L, B, W]      main pools (written)
    src_a / src_b       [L, B*S, W]    per-step pools; (row b, step t) is row b*V + t
    track_a / track_b   [L, P, W]      prefix-store entries, main dtypes (written; tracked only)
    ```

    ``scatter``: row ``b = blockIdx.y`` with ``a = accept_lengths[b]`` in ``[1, max_accept]`` and
    slot ``s`` (``state_indices[b]`` or ``b``) in ``[0, B)`` gets
    ``dst[l, s] = convert(src[l, b*V + a - 1])``, rounding keyed by position ``positions[b] + a``.
    ``tree``: the last non-negative id ``n`` (at index ``j``) of ``node_ids[b, :min(a, M)]``, if
    ``n < V``: ``dst[l, s] = convert(src[l, b*V + n])``, position ``positions[b] + j + 1``.
    ``tracked``: the scatter, then with ``t = track_steps[b]``, ``e = track_entries[b]``: if
    ``0 <= t < a``, ``t < V``, ``0 <= e < P`` and the slot is not ``pad_slot_id``:
    ``track[l, e] = convert(src[l, b*V + t])``, position ``positions[b] + t + 1``. ``positions`` is read only by
    a stochastic kind (the placeholder otherwise); ``seed_lo`` / ``seed_hi`` are the rounding seed's 32-bit halves.

    Grid ``(chunks_a + chunks_b, rows, L)``, block ``(threads,)`` from `launch_shape`.

    Returns:
        A namespace with ``scatter``, ``tree`` and ``tracked`` (``@cuda.jit`` kernels), built once
        per pair of specs.
    """
    chunk_a, chunk_b = _chunk(spec_a), _chunk(spec_b)

    @cuda.jit(device=True, inline="always")
    def both(dst_a, src_a, dst_b, src_b, chunks_a, dst_row, src_row, position, seed_lo, seed_hi):
        layer = cuda.blockIdx.z
        chunk = cuda.blockIdx.x
        if chunk < chunks_a:
            chunk_a(dst_a, src_a, layer, dst_row, src_row, chunk, layer, 0, position, seed_lo, seed_hi)
        else:
            chunk_b(dst_b, src_b, layer, dst_row, src_row, chunk - chunks_a, layer, 1, position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_convert(
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
        positions,
        seed_lo,
        seed_hi,
    ):
        """``scatter_accepted`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        accepted = accepted_steps(accept_lengths, row, max_accept)
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if accepted == 0 or slot < 0:
            return
        position = np.int64(positions[row]) + accepted
        both(dst_a, src_a, dst_b, src_b, chunks_a, slot, row * seq_len + (accepted - 1), position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_tree_convert(
        dst_a,
        src_a,
        dst_b,
        src_b,
        chunks_a,
        node_ids,
        accept_lengths,
        state_indices,
        use_indices,
        seq_len,
        positions,
        seed_lo,
        seed_hi,
    ):
        """``scatter_tree`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        node, depth = last_tree_node(node_ids, accept_lengths, row, seq_len)
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if node < 0 or slot < 0:
            return
        position = np.int64(positions[row]) + depth + 1
        both(dst_a, src_a, dst_b, src_b, chunks_a, slot, row * seq_len + node, position, seed_lo, seed_hi)

    @cuda.jit(cache=False)
    def scatter_tracked_convert(
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
        positions,
        seed_lo,
        seed_hi,
        track_a,
        track_b,
        track_entries,
        track_steps,
    ):
        """``scatter_tracked`` converting to the main pools' dtypes: see `commit_kernels`."""
        row = cuda.blockIdx.y
        accepted = accept_lengths[row]
        slot = row_slot(state_indices, use_indices, row, dst_a.shape[1])
        if accepted_steps(accept_lengths, row, max_accept) > 0 and slot >= 0:
            position = np.int64(positions[row]) + accepted
            src_row = row * seq_len + (accepted - 1)
            both(dst_a, src_a, dst_b, src_b, chunks_a, slot, src_row, position, seed_lo, seed_hi)
        step, entry = tracked_step(track_steps, track_entries, row, accepted, seq_len, track_a.shape[1])
        if step < 0 or is_padding(state_indices, use_indices, row):
            return
        position = np.int64(positions[row]) + step + 1
        both(track_a, src_a, track_b, src_b, chunks_a, entry, row * seq_len + step, position, seed_lo, seed_hi)

    return SimpleNamespace(scatter=scatter_convert, tree=scatter_tree_convert, tracked=scatter_tracked_convert)
