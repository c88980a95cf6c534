"""The 8-bit study's stores: the cache's conversions, bit for bit, in place on float32 blocks (fast).

``mamba_cache.precision.quant8`` is the definition (and ``convert`` the 16-bit one); it works on
uint64 bit patterns, which costs 10 to 50 ns an element. The study stores about 50 million
elements a token at realistic widths, so it uses these float32 / uint32 versions of the same rules,
applied in place to cache-sized blocks; ``tests/test_quant8_study.py`` checks every one against the
library's, bit for bit, stochastic rounding and error-feedback residuals included. They assume
finite states (a non-finite group raises: the study's states are finite).

- 16-bit: ``round_bfloat16`` (nearest even on the float32 pattern), ``round_float16`` (NumPy's cast);
- 8-bit: `store8` quantises groups over the last axis (one scale each) and leaves the dequantised
  values; the rounding of ``q = x / scale`` to the 8-bit grid is
  - int8: ``rint(q)``, or ``floor(q + u)`` with ``u = (r >> 8) * 2**-24`` (float64, as the library);
  - float8 nearest: round to nearest even by adding to the float32 pattern below the kept mantissa
    bits (target normals), or by the ``(q + 2**k) - 2**k`` float32 trick on the fixed subnormal grid;
  - float8 stochastic: add the word's top bits below the kept mantissa bits and truncate (target
    normals); on the subnormal grid ``floor(t + w)`` computed exactly in float64 (``t = |q|`` in
    grid steps, ``w`` the word's bits the library adds, over ``2**s``);
  then ``+-qmax`` saturation, the dequantised value ``stored * scale``, and under error feedback the
  residual ``x_eff - dequantised`` rounded to bfloat16.
"""

from __future__ import annotations

import numpy as np

from mamba_cache.precision import quant8

U32 = np.uint32
#: float8 name -> (mantissa bits, exponent of the smallest normal, exponent bias)
FP8 = {"float8_e4m3fn": (3, -6, 7), "float8_e5m2": (2, -14, 15)}


def round_bfloat16(x: np.ndarray) -> None:
    """``x`` (float32, contiguous, finite) rounded to the nearest even bfloat16, in place."""
    bits = x.view(U32)
    lsb = bits >> U32(16)
    lsb &= U32(1)
    lsb += U32(0x7FFF)
    bits += lsb
    bits &= U32(0xFFFF0000)


def round_float16(x: np.ndarray) -> None:
    """``x`` (float32) rounded to the nearest even float16, in place (NumPy's cast)."""
    x[...] = x.astype(np.float16)


def round16(x: np.ndarray, dtype: str) -> None:
    """``x`` rounded to ``"bfloat16"`` or ``"float16"`` in place (``"float32"``: unchanged)."""
    if dtype == "bfloat16":
        round_bfloat16(x)
    elif dtype == "float16":
        round_float16(x)


def _fp8(q: np.ndarray, name: str, words: np.ndarray | None) -> None:
    """``q`` (float32, ``|q| <= qmax`` up to a rounding) rounded to float8 ``name``, saturated, in place."""
    mant, emin, bias = FP8[name]
    drop = 23 - mant
    a = np.abs(q)
    small = a < np.float32(2.0**emin)  # the target's subnormal grid, step 2**(emin - mant)
    sub = a[small]
    bits = a.view(U32)
    if words is None:
        lsb = bits >> U32(drop)
        lsb &= U32(1)
        lsb += U32((1 << (drop - 1)) - 1)
        bits += lsb
    else:
        bits += np.broadcast_to(words, q.shape) >> U32(32 - drop)
    bits &= U32(~((1 << drop) - 1) & 0xFFFFFFFF)
    if sub.size:
        if words is None:
            magic = np.float32(2.0 ** (23 + emin - mant))
            a[small] = (sub + magic) - magic
        else:
            r = np.broadcast_to(words, q.shape)[small].astype(np.float64)
            exp = ((sub.view(U32) >> U32(23)) & U32(0xFF)).astype(np.int64)
            shift = drop + 1 - (exp - 127 + bias)  # the library's bits to round off
            w = np.ldexp(np.floor(np.ldexp(r, shift - 32)), -shift)  # the word's added bits, / 2**shift
            t = np.ldexp(sub.astype(np.float64), mant - emin)  # |q| in grid steps, exact
            whole = np.floor(t)
            code = whole + (t - whole >= 1.0 - w)
            a[small] = np.where(exp == 0, 0.0, np.ldexp(code, emin - mant)).astype(np.float32)
    np.minimum(a, np.float32(quant8.QMAX[name]), out=a)
    np.copysign(a, q, out=q)


def store8(
    x: np.ndarray,
    name: str,
    words: np.ndarray | None = None,
    uniform: np.ndarray | None = None,
    residual: np.ndarray | None = None,
) -> None:
    """Quantise ``x`` ``[..., n]`` (float32 view) in groups of the last axis and leave the dequantised values.

    Args:
        x: float32 states, one scale group per index of the leading axes (written in place).
        name: ``"float8_e4m3fn"``, ``"float8_e5m2"`` or ``"int8"``.
        words: float8 stochastic rounding: uint32 words broadcastable to ``x`` (the cache's).
        uniform: int8 stochastic rounding: ``(words >> 8) * 2**-24`` float64, broadcastable to ``x``.
        residual: error feedback: float32 residuals of ``x``'s shape, added first and replaced by the new
            ones (bfloat16 values).
    """
    if residual is not None:
        x += residual
    amax = np.maximum(x.max(axis=-1), -x.min(axis=-1))
    scale = amax / np.float32(quant8.QMAX[name])
    np.maximum(scale, quant8.SCALE_FLOOR, out=scale)
    if not np.isfinite(scale).all():
        raise FloatingPointError("the study's fast store takes finite states only")
    scale = scale[..., None]
    q = x / scale
    if name == "int8":
        if uniform is None:
            np.rint(q, out=q)
        else:
            wide = q.astype(np.float64)
            wide += uniform
            np.floor(wide, out=wide)
            np.clip(wide, -127.0, 127.0, out=wide)
            q[...] = wide
        q += np.float32(0)  # the int8 code has no -0
    else:
        _fp8(q, name, words)
    q *= scale
    if residual is not None:
        np.subtract(x, q, out=residual)
        round_bfloat16(residual)
    x[...] = q


def store_column(col: np.ndarray, name: str, words=None, uniform=None) -> None:
    """A conv column ``[R, C]`` (float32, contiguous, ``C`` a multiple of 64) stored with one scale per 64 channels."""
    rows, channels = col.shape
    blocks = channels // quant8.CONV_BLOCK
    grouped = col.reshape(rows, blocks, quant8.CONV_BLOCK)
    if words is not None:
        words = words.reshape(blocks, quant8.CONV_BLOCK)
    if uniform is not None:
        uniform = uniform.reshape(blocks, quant8.CONV_BLOCK)
    store8(grouped, name, words, uniform)
