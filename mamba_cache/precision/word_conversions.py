"""Device-side word and group conversions of the converting commits: Philox, element and 4-element-group steps.

The building blocks `mamba_cache.precision.commit_kernels` assembles into its per-dtype-pair chunk
functions (its module docstring gives the layout and the rules): Philox4x32-10 on 32-bit words with
the per-thread work hoisted (`philox_setup` once, `philox_group` per group), each element conversion
between float32, float16 and bfloat16 bit patterns (nearest and stochastic, the hardware's
conversions where they give the reference's bits), and the unpack / pack / store steps of a group of
4 elements held in uint64 words. Every function is an inlined ``@cuda.jit`` device function; the
rounding is the reference's (`mamba_cache.precision.reference`) bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..core.device import SIMULATOR
from .kernels import (
    MODE_STOCHASTIC,
    convert_bits,
    float32_bits,
    float32_from_bits,
    half_bits_to_float32,
    half_rn_bits,
    half_rz_bits,
)
from .reference import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

_U32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(0xFFFF)


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
def bf16_to_f32(x, r):
    """bfloat16 bits (the low 16 of ``x``) as float32 bits, exactly; a NaN gets its quiet bit set."""
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
    return np.uint64(_f32_to_f16_rn(bf16_to_f32(x, r) & _U32))


def converter(mode: int, se: int, sm: int, de: int, dm: int):
    """The device function ``(bits: uint64, random: uint32) -> uint64`` of one dtype pair and mode."""
    stochastic = mode == MODE_STOCHASTIC
    pair = (se, sm, de, dm)
    if pair == (8, 23, 8, 7):
        return _f32_to_bf16_stochastic if stochastic else _f32_to_bf16_nearest
    if pair == (8, 7, 8, 23):
        return bf16_to_f32
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
def f32_to_bf16_group(buf, o, stochastic, r0, r1, r2, r3):
    """A group of 4 float32 (two words of ``buf`` at ``o``) as one word of 4 bfloat16, in 32-bit arithmetic."""
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
def f16_stochastic_fast(x, r):
    """float32 bits to float16 bits (uint32), rounded stochastically, and the rare-case flag.

    For |x| in [2**-14, 65504) (a normal float16 result that cannot overflow) the reference's steps are (mag -
    (112 << 23) + (r >> 19)) >> 13 with the sign: adding the 13 random bits to the float32 bit pattern and
    truncating it toward zero to float16 (cvt.rz) is the same, since a float16 normal is the float32 pattern
    rebiased with 13 bits dropped. For |x| < 2**-126 (zeros, float32 subnormals) the sum stays below 2**-125 and
    truncates to the signed zero the reference gives. Everything else (subnormal results, |x| >= 65504,
    infinities, NaNs) is flagged, for the full steps.
    """
    x32 = np.uint32(x)
    # the sum wraps only for a negative NaN (flagged below); added in 64 bits and masked, since the
    # simulator's NumPy scalars warn on a wrapping 32-bit add (the GPU's code is the same either way)
    h = half_rz_bits(float32_from_bits(np.uint32((np.uint64(x32) + np.uint64(np.uint32(r) >> np.uint32(19))) & _U32)))
    f = abs(float32_from_bits(x32))
    fast = (f < np.float32(2.0**-126)) | ((f >= np.float32(2.0**-14)) & (f < np.float32(65504.0)))
    return h, not fast


@cuda.jit(device=True, inline="always")
def f32_to_f16_group(buf, o, stochastic, r0, r1, r2, r3):
    """A group of 4 float32 (two words of ``buf`` at ``o``) as one word of 4 float16 and a rare-case flag.

    The flag is a uint32 0 / 1; 32-bit arithmetic, no branch. Nearest: one hardware conversion per element (NaN
    fixed up by a select), never rare. Stochastic: every element through f16_stochastic_fast; the flag says a
    subnormal result, |x| >= 65504, an infinity or a NaN may have made the word wrong, for f32_to_f16_sr_exact
    to redo after the group loop.
    """
    w0 = buf[o]
    w1 = buf[o + 1]
    x0, x1 = np.uint32(w0 & _U32), np.uint32(w0 >> np.uint64(32))
    x2, x3 = np.uint32(w1 & _U32), np.uint32(w1 >> np.uint64(32))
    if stochastic:
        q0, k0 = f16_stochastic_fast(x0, r0)
        q1, k1 = f16_stochastic_fast(x1, r1)
        q2, k2 = f16_stochastic_fast(x2, r2)
        q3, k3 = f16_stochastic_fast(x3, r3)
        rare = np.uint32(np.uint32(k0) | np.uint32(k1) | np.uint32(k2) | np.uint32(k3))
    else:
        q0, q1, q2, q3 = _f32_to_f16_rn(x0), _f32_to_f16_rn(x1), _f32_to_f16_rn(x2), _f32_to_f16_rn(x3)
        rare = np.uint32(0)
    lo = np.uint32(q0 | (q1 << np.uint32(16)))
    hi = np.uint32(q2 | (q3 << np.uint32(16)))
    return np.uint64(lo) | (np.uint64(hi) << np.uint64(32)), rare


@cuda.jit(device=True, inline="always")
def f32_to_f16_sr_exact(w0, w1, r0, r1, r2, r3):
    """A group of 4 float32 (two uint64 words) as one word of 4 float16, stochastic, by the full steps."""
    q0 = _f32_to_f16_stochastic(w0 & _U32, r0)
    q1 = _f32_to_f16_stochastic(w0 >> np.uint64(32), r1)
    q2 = _f32_to_f16_stochastic(w1 & _U32, r2)
    q3 = _f32_to_f16_stochastic(w1 >> np.uint64(32), r3)
    return q0 | (q1 << np.uint64(16)) | (q2 << np.uint64(32)) | (q3 << np.uint64(48))


UNPACK = {2: _unpack2, 4: _unpack4, 8: _unpack8}
STORE = {2: _store2, 4: _store4, 8: _store8}
