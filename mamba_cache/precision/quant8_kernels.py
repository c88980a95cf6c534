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

from .kernels import convert_bits, float32_bits, float32_from_bits

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
        if x != x or abs(x) == math.inf:
            finite = False
        elif abs(x) > amax:
            amax = abs(x)
    scale = group_scale(amax, finite, QMAX[code])
    scales[row] = scale
    for i in range(src.shape[1]):
        values[row, i] = quantise_code(src[row, i], scale, code, stochastic, np.uint64(random[row, i]))
