"""CUDA device functions of the precision options: conversions, Philox4x32-10, storing a float32 state.

The device functions repeat [`mamba_cache.precision.reference`][mamba_cache.precision.reference] line for line on uint64
scalars (integer arithmetic only), so the GPU gives the reference's bits. The converting commits
(scatter, tree, tracked) are built from them per dtype pair in
`mamba_cache.precision.commit_kernels`; this module keeps the general element path they fall
back to for slots that are not a multiple of 4 elements, and `convert_array` (a test and
benchmark helper). Pools are seen as unsigned integers of their element size (bit patterns; a
bfloat16 pool is uint16 already):

    dst   [1, rows, E]     target bit patterns
    src   [1, rows, E]     source bit patterns

Launch shape of the element path (``GROUPS_PER_THREAD`` groups of 4 consecutive elements per
thread, so one Philox4x32-10 call gives the 4 random words of a group):

    grid  = (ceil(ceil(E / 4) / (threads * GROUPS_PER_THREAD)), rows, 1)
    block = (threads,)

    slot row (E elements) |<------------ chunk 0 ------------>|<- chunk 1 ...
                          | g0 g1 .. gT | g0 g1 .. gT |          (g = 4 elements; round i of
                          |  round 0    |  round 1    |           a chunk: threads groups)

``mode`` 0 copies the bits (equal dtypes), 1 rounds to nearest even, 2 rounds stochastically;
``src_e, src_m, dst_e, dst_m`` are the formats (exponent and mantissa bits).

Conversions PTX has and libdevice lacks are inline-PTX intrinsics here, each one instruction:
`half_rz_bits` (``cvt.rz.f16.f32``, the float16 stochastic commit's truncation),
`bfloat16_rn_bits` (``cvt.rn.bf16.f32``, sm_80 and up: the replay kernels' bfloat16
rounding), and for the replay's packed 16-bit tiles the pair roundings `half2_rn_bits`
(``cvt.rn.f16x2.f32``) and `bfloat162_rn_bits` (``cvt.rn.bf16x2.f32``), both sm_80 and
up, and `half_low_float32` / `half_high_float32` (``cvt.f32.f16`` of either half of
a 32-bit word). On the simulator NumPy (ml_dtypes for bfloat16) stands in for them.

Cost: float32 <-> bfloat16 takes a shortcut in `convert_bits` (a shift and an add on the
bit pattern, same bits as the general steps); the other pairs run the general uint64 steps.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from numba import cuda

from ..core.device import SIMULATOR
from ..core.launch import slot_launch_shape
from .reference import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

#: Groups of 4 elements each thread converts.
GROUPS_PER_THREAD = 2
#: Conversion modes.
MODE_COPY, MODE_NEAREST, MODE_STOCHASTIC = 0, 1, 2


def launch_shape(*elems: int) -> tuple[tuple[int, ...], int]:
    """``((chunks, ...), threads)`` covering slots of ``elems`` elements each, in one launch."""
    return slot_launch_shape([-(-e // 4) for e in elems], [GROUPS_PER_THREAD] * len(elems))


@cuda.jit(device=True, inline="always")
def _mulhilo(a, b):
    # One 32 x 32 -> 64-bit product (the compiler emits a wide multiply): its high and low words.
    # numba-cuda exposes no __umulhi, and this is exact integer arithmetic on every target.
    product = np.uint64(a) * np.uint64(b)
    return np.uint64(product >> np.uint64(32)), np.uint64(product & np.uint64(0xFFFFFFFF))


@cuda.jit(device=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of one counter ``(c0..c3)`` under key ``(k0, k1)``; each value < 2**32, as uint64.

    Returns:
        The four random words (uint64 holding 32-bit values), as in the reference.
    """
    # New names, not the parameters rebound: Numba unifies int64 with uint64 to float64.
    x0, x1, x2, x3 = np.uint64(c0), np.uint64(c1), np.uint64(c2), np.uint64(c3)
    key0, key1 = np.uint64(k0), np.uint64(k1)
    mask = np.uint64(0xFFFFFFFF)
    for round_ in range(10):
        if round_ > 0:
            key0 = (key0 + np.uint64(PHILOX_W0)) & mask
            key1 = (key1 + np.uint64(PHILOX_W1)) & mask
        hi0, lo0 = _mulhilo(PHILOX_M0, x0)
        hi1, lo1 = _mulhilo(PHILOX_M1, x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ key0, lo1, hi0 ^ x3 ^ key1, lo0
    return x0, x1, x2, x3


@cuda.jit(device=True)
def convert_bits(bits, se, sm, de, dm, stochastic, random):
    """One bit pattern of format ``(se, sm)`` converted to ``(de, dm)``; see the reference's steps.

    Args:
        bits: the source pattern (any unsigned int).
        se: exponent bits of the source format.
        sm: mantissa bits of the source format.
        de: exponent bits of the target format.
        dm: mantissa bits of the target format.
        stochastic: 1 to add ``random`` below the target's last place and truncate, 0 for nearest even.
        random: a 32-bit random word (uint64); ignored unless ``stochastic``.

    Returns:
        The target pattern as uint64.
    """
    # float32 <-> bfloat16, the common pair: the same result in a few 32-bit-sized operations
    # (both share float32's exponent, so the general steps reduce to a shift of the pattern)
    if se == 8 and sm == 23 and de == 8 and dm == 7:
        x32 = np.uint64(bits) & np.uint64(0xFFFFFFFF)
        top = (x32 >> np.uint64(16)) & np.uint64(0x8000)
        mag = x32 & np.uint64(0x7FFFFFFF)
        if mag > np.uint64(0x7F800000):  # NaN: quiet, top payload bits kept
            return top | np.uint64(0x7FC0) | (mag >> np.uint64(16))
        if stochastic:
            rounded = (mag + (np.uint64(random) >> np.uint64(16))) >> np.uint64(16)
        else:
            rounded = (mag + np.uint64(0x7FFF) + ((mag >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
        return top | rounded
    if se == 8 and sm == 7 and de == 8 and dm == 23:
        x16 = np.uint64(bits) & np.uint64(0xFFFF)
        wide = x16 << np.uint64(16)
        if (x16 & np.uint64(0x7FFF)) > np.uint64(0x7F80):  # NaN: set the quiet bit
            wide = wide | np.uint64(0x00400000)
        return wide
    # 64-bit copies under new names (the arguments may be int32; Numba keeps a variable one type)
    e_src, m_src, e_dst, m_dst = np.int64(se), np.int64(sm), np.int64(de), np.int64(dm)
    one = np.uint64(1)
    x = np.uint64(bits)
    sign = (x >> np.uint64(e_src + m_src)) & one
    exp = np.int64((x >> np.uint64(m_src)) & np.uint64((1 << e_src) - 1))
    man = x & np.uint64((1 << m_src) - 1)
    s_bias = (1 << (e_src - 1)) - 1
    d_bias = (1 << (e_dst - 1)) - 1
    inf_code = np.uint64(((1 << e_dst) - 1) << m_dst)
    if exp == (1 << e_src) - 1:  # infinity or NaN
        if man == 0:
            return inf_code | (sign << np.uint64(e_dst + m_dst))
        payload = man >> np.uint64(m_src - m_dst) if m_src >= m_dst else man << np.uint64(m_dst - m_src)
        return inf_code | np.uint64(1 << (m_dst - 1)) | payload | (sign << np.uint64(e_dst + m_dst))
    if exp == 0 and man == 0:
        return sign << np.uint64(e_dst + m_dst)
    # 1. normalise
    if exp == 0:
        lead = 0
        m = man
        for step in (32, 16, 8, 4, 2, 1):
            if (m >> np.uint64(step)) != 0:
                lead += step
                m = m >> np.uint64(step)
        sig = man << np.uint64(m_src - lead)
        unbiased = lead - m_src + 1 - s_bias
    else:
        sig = man | np.uint64(1 << m_src)
        unbiased = exp - s_bias
    # 2. target exponent field, bits to drop
    e_d = unbiased + d_bias
    if e_d >= 1:
        a = (np.uint64(e_d) << np.uint64(m_src)) | (sig & np.uint64((1 << m_src) - 1))
        shift = m_src - m_dst
    else:
        a = sig
        shift = m_src - m_dst + 1 - e_d
    # 3. round
    if shift <= 0:
        result = a << np.uint64(-shift)
    elif shift > 62:
        result = np.uint64(0)
    else:
        s = np.uint64(shift)
        if stochastic:
            r = np.uint64(random)
            add = r >> (np.uint64(32) - s) if shift <= 32 else r << (s - np.uint64(32))
            result = (a + add) >> s
        else:
            result = a >> s
            rem = a & ((one << s) - one)
            half = one << (s - one)
            if rem > half or (rem == half and (result & one) == one):
                result = result + one
    # 4. overflow
    if result > inf_code:
        result = inf_code
    return result | (sign << np.uint64(e_dst + m_dst))


@cuda.jit(device=True, inline="always")
def _convert_chunk(
    dst, src, layer, dst_row, src_row, chunk, key_layer, kind, position, mode, se, sm, de, dm, seed_lo, seed_hi
):
    """Convert (or copy) chunk ``chunk`` of one slot: groups of 4 elements, one Philox call each.

    ``layer`` indexes the arrays; ``key_layer`` is the layer number in the rounding counter.
    """
    threads = cuda.blockDim.x
    elems = dst.shape[2]
    for i in range(GROUPS_PER_THREAD):
        group = (chunk * GROUPS_PER_THREAD + i) * threads + cuda.threadIdx.x
        first = group * 4
        if first < elems:
            r0 = r1 = r2 = r3 = np.uint64(0)
            if mode == MODE_STOCHASTIC:
                r0, r1, r2, r3 = philox4x32_10(
                    group & 0xFFFFFFFF, position & 0xFFFFFFFF, key_layer & 0xFFFFFFFF, kind, seed_lo, seed_hi
                )
            for j in range(4):
                e = first + j
                if e < elems:
                    value = src[layer, src_row, e]
                    if mode == MODE_COPY:
                        dst[layer, dst_row, e] = value
                    else:
                        r = r0 if j == 0 else (r1 if j == 1 else (r2 if j == 2 else r3))
                        dst[layer, dst_row, e] = convert_bits(value, se, sm, de, dm, mode == MODE_STOCHASTIC, r)


@cuda.jit(cache=False)
def convert_array(dst, src, formats, layer, kind, positions, seed_lo, seed_hi):
    """Convert rows of states: ``dst[0, r, e] = convert(src[0, r, e])``, position ``positions[r]``.

    A test and benchmark helper (and what a model's decode step uses to store its float32 state).

    Args:
        dst (DeviceNDArray): ``[1, rows, E]`` target bit patterns (written).
        src (DeviceNDArray): ``[1, rows, E]`` source bit patterns.
        formats (DeviceNDArray): ``[5]`` int32 ``mode, src_e, src_m, dst_e, dst_m``.
        layer (int): the layer number in the rounding counter.
        kind (int): 0 recurrent, 1 conv.
        positions (DeviceNDArray): ``[rows]`` int32 tokens consumed.
        seed_lo (int): the low 32 bits of the rounding seed.
        seed_hi (int): the high 32 bits of the rounding seed.

    Grid ``(chunks, rows, 1)``, block ``(threads,)``.
    """
    row = cuda.blockIdx.y
    _convert_chunk(
        dst,
        src,
        0,
        row,
        row,
        cuda.blockIdx.x,
        layer,
        kind,
        np.int64(positions[row]),
        formats[0],
        formats[1],
        formats[2],
        formats[3],
        formats[4],
        seed_lo,
        seed_hi,
    )


# ---------------------------------------------------------------- storing a computed float32 state


if SIMULATOR:  # the simulator has no libdevice: bit-cast through a one-element local array

    @cuda.jit(device=True, inline="always")
    def float32_bits(value):
        """The bit pattern of a float32, as uint32."""
        buf = cuda.local.array(1, np.float32)
        buf[0] = value
        return buf.view(np.uint32)[0]

    @cuda.jit(device=True, inline="always")
    def float32_from_bits(bits):
        """The float32 of a 32-bit pattern."""
        buf = cuda.local.array(1, np.uint32)
        buf[0] = np.uint32(bits)
        return buf.view(np.float32)[0]

else:  # on the GPU: libdevice's register bit casts (__float_as_int, __int_as_float)
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline="always")
    def float32_bits(value):
        """The bit pattern of a float32, as uint32."""
        return np.uint32(libdevice.float_as_int(np.float32(value)))

    @cuda.jit(device=True, inline="always")
    def float32_from_bits(bits):
        """The float32 of a 32-bit pattern."""
        return libdevice.int_as_float(np.int32(np.uint32(bits)))


# ---------------------------------------------------------------- float16 <-> float32 in hardware


if SIMULATOR:  # the simulator has no libdevice: NumPy's casts (float32 -> float16 rounds to nearest even)

    @cuda.jit(device=True, inline="always")
    def half_rn_bits(f):
        """float32 ``f`` rounded to the nearest even float16, as its bits (uint32): ``cvt.rn.f16.f32``."""
        with np.errstate(over="ignore"):
            return np.uint32(np.array(f, np.float32).astype(np.float16).view(np.uint16))

    @cuda.jit(device=True, inline="always")
    def half_bits_to_float32(h):
        """The float32 of the float16 bit pattern ``h`` (the low 16 bits): ``cvt.f32.f16``, exact."""
        return np.float32(np.array(h, np.uint32).astype(np.uint16).view(np.float16))

else:  # libdevice's __float2half_rn and __half2float: cvt.rn.f16.f32 and cvt.f32.f16, one instruction each

    @cuda.jit(device=True, inline="always")
    def half_rn_bits(f):
        """float32 ``f`` rounded to the nearest even float16, as its bits (uint32): ``cvt.rn.f16.f32``."""
        return np.uint32(np.uint16(libdevice.float2half_rn(np.float32(f))))

    @cuda.jit(device=True, inline="always")
    def half_bits_to_float32(h):
        """The float32 of the float16 bit pattern ``h`` (the low 16 bits): ``cvt.f32.f16``, exact."""
        return libdevice.half2float(np.int16(np.uint16(h)))


if SIMULATOR:  # NumPy stands in for the two conversions PTX has and libdevice lacks

    @cuda.jit(device=True, inline="always")
    def half_rz_bits(f):
        """float32 ``f`` truncated toward zero to float16, as its bits (uint32): ``cvt.rz.f16.f32``."""
        # NumPy's nearest, one step back toward zero when it rounded away (float16 bit patterns are
        # sign-magnitude, so one less is one step toward zero for either sign)
        with np.errstate(over="ignore", invalid="ignore"):
            h = np.array(f, np.float32).astype(np.float16)
            if abs(np.float32(h)) > abs(np.float32(f)):
                return np.uint32(h.view(np.uint16) - np.uint16(1))
            return np.uint32(h.view(np.uint16))

    @cuda.jit(device=True, inline="always")
    def bfloat16_rn_bits(f):
        """float32 ``f`` rounded to the nearest even bfloat16, as its bits (uint32): ``cvt.rn.bf16.f32``."""
        # ml_dtypes' cast (IEEE nearest even), not the integer shortcut it stands beside, so a test
        # of round_bfloat16_hw on the simulator checks one against the other; a NaN's bits are
        # the caller's to select
        with np.errstate(invalid="ignore", over="ignore"):
            return np.uint32(np.array(f, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))

else:  # inline PTX: one instruction each
    from llvmlite import ir
    from numba.cuda import types as nbtypes
    from numba.cuda.extending import intrinsic

    def _cvt_intrinsic(instruction: str):
        """An intrinsic ``float32 -> uint16`` that is the one PTX conversion ``instruction``."""

        @intrinsic
        def cvt(typingctx, f):
            def codegen(context, builder, signature, args):
                fnty = ir.FunctionType(ir.IntType(16), [ir.FloatType()])
                return builder.call(ir.InlineAsm(fnty, f"{instruction} $0, $1;", "=h,f"), args)

            return nbtypes.uint16(nbtypes.float32), codegen

        return cvt

    _cvt_rz_f16 = _cvt_intrinsic("cvt.rz.f16.f32")
    _cvt_rn_bf16 = _cvt_intrinsic("cvt.rn.bf16.f32")  # sm_80 and later

    @cuda.jit(device=True, inline="always")
    def half_rz_bits(f):
        """float32 ``f`` truncated toward zero to float16, as its bits (uint32): ``cvt.rz.f16.f32``."""
        return np.uint32(_cvt_rz_f16(np.float32(f)))

    @cuda.jit(device=True, inline="always")
    def bfloat16_rn_bits(f):
        """float32 ``f`` rounded to the nearest even bfloat16, as its bits (uint32): ``cvt.rn.bf16.f32`` (sm_80+).

        A NaN gives the hardware's canonical NaN (callers select their own).
        """
        return np.uint32(_cvt_rn_bf16(np.float32(f)))


# ---------------------------------------------------------------- two 16-bit values in one 32-bit word


if SIMULATOR:  # the one-value conversions above, twice

    @cuda.jit(device=True, inline="always")
    def half2_rn_bits(low, high):
        """float32 ``low`` and ``high`` rounded to the nearest even float16, packed as uint32 (``low`` in bits 0-15).

        ``cvt.rn.f16x2.f32`` (sm_80+): one instruction for two values, the bits of `half_rn_bits` of each.
        """
        return half_rn_bits(low) | (half_rn_bits(high) << np.uint32(16))

    @cuda.jit(device=True, inline="always")
    def bfloat162_rn_bits(low, high):
        """float32 ``low`` and ``high`` rounded to the nearest even bfloat16, packed as uint32 (``low`` in bits 0-15).

        ``cvt.rn.bf16x2.f32`` (sm_80+): the bits of `bfloat16_rn_bits` of each (a NaN gives the
        hardware's canonical NaN).
        """
        return bfloat16_rn_bits(low) | (bfloat16_rn_bits(high) << np.uint32(16))

    @cuda.jit(device=True, inline="always")
    def half_low_float32(word):
        """The float32 of the float16 in bits 0-15 of a uint32 ``word`` (exact)."""
        return half_bits_to_float32(np.uint32(word) & np.uint32(0xFFFF))

    @cuda.jit(device=True, inline="always")
    def half_high_float32(word):
        """The float32 of the float16 in bits 16-31 of a uint32 ``word`` (exact)."""
        return half_bits_to_float32(np.uint32(word) >> np.uint32(16))

else:  # inline PTX: one instruction each (the halves read in place, no shift)

    def _pair_intrinsic(instruction: str):
        """An intrinsic ``(float32 low, float32 high) -> uint32`` that is the one PTX conversion ``instruction``."""

        @intrinsic
        def cvt(typingctx, low, high):
            def codegen(context, builder, signature, args):
                fnty = ir.FunctionType(ir.IntType(32), [ir.FloatType(), ir.FloatType()])
                # cvt.*x2 d, a, b puts a's result in the upper half
                return builder.call(ir.InlineAsm(fnty, f"{instruction} $0, $2, $1;", "=r,f,f"), args)

            return nbtypes.uint32(nbtypes.float32, nbtypes.float32), codegen

        return cvt

    def _half_intrinsic(half: str):
        """An intrinsic ``uint32 -> float32``: ``cvt.f32.f16`` of the ``half`` ("low" or "high") of the word."""
        pick = "{%lo, %hi}"
        source = "%lo" if half == "low" else "%hi"

        @intrinsic
        def cvt(typingctx, word):
            def codegen(context, builder, signature, args):
                fnty = ir.FunctionType(ir.FloatType(), [ir.IntType(32)])
                asm = f"{{ .reg .b16 %lo, %hi; mov.b32 {pick}, $1; cvt.f32.f16 $0, {source}; }}"
                return builder.call(ir.InlineAsm(fnty, asm, "=f,r"), args)

            return nbtypes.float32(nbtypes.uint32), codegen

        return cvt

    _cvt_rn_f16x2 = _pair_intrinsic("cvt.rn.f16x2.f32")
    _cvt_rn_bf16x2 = _pair_intrinsic("cvt.rn.bf16x2.f32")  # sm_80 and later
    _half_low = _half_intrinsic("low")
    _half_high = _half_intrinsic("high")

    @cuda.jit(device=True, inline="always")
    def half2_rn_bits(low, high):
        """float32 ``low`` and ``high`` rounded to the nearest even float16, packed as uint32 (``low`` in bits 0-15).

        ``cvt.rn.f16x2.f32`` (sm_80+): one instruction for two values, the bits of `half_rn_bits` of each.
        """
        return _cvt_rn_f16x2(np.float32(low), np.float32(high))

    @cuda.jit(device=True, inline="always")
    def bfloat162_rn_bits(low, high):
        """float32 ``low`` and ``high`` rounded to the nearest even bfloat16, packed as uint32 (``low`` in bits 0-15).

        ``cvt.rn.bf16x2.f32`` (sm_80+): the bits of `bfloat16_rn_bits` of each (a NaN gives the
        hardware's canonical NaN).
        """
        return _cvt_rn_bf16x2(np.float32(low), np.float32(high))

    @cuda.jit(device=True, inline="always")
    def half_low_float32(word):
        """The float32 of the float16 in bits 0-15 of a uint32 ``word`` (exact)."""
        return _half_low(np.uint32(word))

    @cuda.jit(device=True, inline="always")
    def half_high_float32(word):
        """The float32 of the float16 in bits 16-31 of a uint32 ``word`` (exact)."""
        return _half_high(np.uint32(word))


@cuda.jit(device=True, inline="always")
def load_float32(value, bits16):
    """A state element as float32: a float pool's value, or (``bits16``) a bfloat16 pool's raw bits."""
    if bits16:
        return float32_from_bits(np.uint32(value) << np.uint32(16))
    return np.float32(value)


@cuda.jit(device=True)
def stored_value(value, mode, dst_e, dst_m, element, position, layer, kind, seed_lo, seed_hi):
    """A computed float32 ``value`` as a state of format ``(dst_e, dst_m)`` stores it, as a float32.

    ``mode`` 0 returns ``value`` (the pool's own store rounds it: a float32 or wider pool, or a float16 pool rounding to
    nearest in hardware, which agrees with the reference); 1 rounds to nearest even and 2 stochastically, with the bits
    of ``(seed, layer, kind, position, element)`` as in
    [`mamba_cache.precision.reference.rounding_bits`][mamba_cache.precision.reference.rounding_bits]. The result is
    exactly representable in the target, so storing it into a float16 pool is exact; a bfloat16 (uint16) pool takes
    ``float32_bits(result) >> 16``.
    """
    if mode == MODE_COPY:
        return np.float32(value)
    random = np.uint64(0)
    if mode == MODE_STOCHASTIC:
        r0, r1, r2, r3 = philox4x32_10(
            (element // 4) & 0xFFFFFFFF, position & 0xFFFFFFFF, layer & 0xFFFFFFFF, kind, seed_lo, seed_hi
        )
        lane = element % 4
        random = r0 if lane == 0 else (r1 if lane == 1 else (r2 if lane == 2 else r3))
    narrow = convert_bits(float32_bits(value), 8, 23, dst_e, dst_m, mode == MODE_STOCHASTIC, random)
    return float32_from_bits(convert_bits(narrow, dst_e, dst_m, 8, 23, False, np.uint64(0)))


def store_formats(config, main_dtype, inter_dtype) -> np.ndarray:
    """``[8]`` int32 ``mode, e, m, bits16`` of a main pool, then of its per-step pool, for `stored_value`.

    ``bits16`` is 1 for bfloat16 (stored as uint16 raw bits). Stochastic rounding (mode 2) where the
    config asks for it and the pool is 16-bit; otherwise nearest even by integer arithmetic for
    bfloat16 (mode 1), and the pool's own store for the float types (mode 0).
    """
    from .reference import dtype_format, rounds_stochastically

    values = []
    for dtype in (main_dtype, inter_dtype):
        if rounds_stochastically(config.stochastic_rounding, dtype):
            mode = MODE_STOCHASTIC
        elif dtype.name == "bfloat16":
            mode = MODE_NEAREST
        else:
            mode = MODE_COPY
        values += [mode, *dtype_format(dtype), int(dtype.name == "bfloat16")]
    return np.array(values, dtype=np.int32)
