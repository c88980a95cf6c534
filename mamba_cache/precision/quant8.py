"""The NumPy reference of the 8-bit state dtypes: scales, quantisation, dequantisation, error feedback.

Three 8-bit dtypes, each with the largest magnitude it stores (``qmax``):

    float8_e4m3fn   (4, 3), bias 7    qmax 448     no infinity; code 0x7F is NaN
    float8_e5m2     (5, 2), bias 15   qmax 57344   IEEE: 0x7C infinity, 0x7D..0x7F NaN
    int8            -127 .. 127                 qmax 127     -128 is NaN

(``ml_dtypes`` gives NumPy both float8 types; the cache never stores an infinity.)

A state is stored in groups, each with one float32 scale:

- recurrent state ``[..., H, D, N]``: one group per ``(head, d)``, over the ``N`` elements
  (scales ``[..., H, D]``);
- conv window ``[..., C, K]``: one group per (block of ``CONV_BLOCK`` = 64 channels, column), so a
  column carries its own scales and keeps them as the window shifts (scales ``[..., ceil(C / 64), K]``;
  the last block may be short).

The rule, for one group ``x`` (float32):

1. ``amax`` = the largest finite magnitude (0 for an all-zero group);
   ``scale = max(amax / qmax, 2**-126)`` in float32 (a true IEEE division; the floor keeps the
   scale a normal number, so ``x / scale`` never overflows). A group holding a NaN or an infinity
   gets ``scale = NaN`` and every element the dtype's NaN code (0x7F, 0x7E, -128): it dequantises to NaN.
2. ``q = x / scale``, an IEEE float32 division (``|q| <= qmax`` up to one rounding).
3. ``q`` rounded to the dtype and saturated to ``+-qmax``:
   - float8, nearest: round to nearest even;
   - float8, stochastic: the 16-bit rule of
     [`convert_bits`][mamba_cache.precision.reference.convert_bits]: add the random word's bits below the
     target's last place to ``q``'s float32 pattern and truncate;
   - int8, nearest: ``rint(q)`` (ties to even);
   - int8, stochastic: ``floor(q + u)`` with ``u = (r >> 8) * 2**-24`` in ``[0, 1)`` (exact: a float64
     sum either is exact or lies where rounding cannot move it across an integer);
   then values past ``qmax`` become ``+-qmax`` (int8 never stores -128 for a number).
4. Dequantised value: ``stored * scale`` in float32 (``stored`` as a float32: exact).

Random words (uint32, one per element) are the precision module's Philox words
([`rounding_bits`][mamba_cache.precision.reference.rounding_bits]): a recurrent element takes the word of its
index within the slot and the token count of the state it belongs to; a conv column takes the words of
the column it was when it entered the window (the last, ``K - 1``) at the token count of that moment
(``position - (K - 1 - k)`` for column ``k`` of a window after ``position`` tokens), so a column's bits
never depend on where it has shifted to ([`conv_rounding_bits`][mamba_cache.precision.quant8.conv_rounding_bits]).

Error feedback (optional): the residual of the last store, ``x_eff - dequantised``, kept per element in
``RESIDUAL_DTYPE`` (bfloat16: the exponent range of float32, so a residual of a tiny group never
flushes to zero, and 8 significant bits of a correction already below half a quantisation step),
rounded to nearest even; the next store quantises ``x_eff = x + residual`` (float32) instead of ``x``.
A NaN group leaves a zero residual.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from .reference import KIND_CONV, convert, convert_bits, rounding_bits

__all__ = [
    "CONV_BLOCK",
    "QMAX",
    "QUANT8_DTYPE_NAMES",
    "RESIDUAL_DTYPE",
    "SCALE_FLOOR",
    "SLOT_SCALE_POOLS",
    "Quantised",
    "conv_rounding_bits",
    "conv_scales",
    "dequantise",
    "expand_conv_scales",
    "group_scales",
    "is_quant8",
    "quantise",
    "quantise_values",
    "recurrent_rounding_bits",
    "shift_in_columns",
    "store",
    "within_one_step",
]

#: The 8-bit state dtypes, in the order error messages list them.
QUANT8_DTYPE_NAMES = ("float8_e4m3fn", "float8_e5m2", "int8")
#: The largest magnitude each 8-bit dtype stores.
QMAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0, "int8": 127.0}
#: The smallest scale: float32's smallest normal number.
SCALE_FLOOR = np.float32(2.0**-126)
#: Channels per conv scale group.
CONV_BLOCK = 64
#: The error-feedback residual's dtype.
RESIDUAL_DTYPE = np.dtype(ml_dtypes.bfloat16)
#: The pools beside a slot's 8-bit states, in the order every operation that moves a slot lists them
#: after the recurrent and conv states (those a cache has: ``Config.scale_pools`` without the per-step ones).
SLOT_SCALE_POOLS = ("scales_recurrent", "scales_conv", "residual_recurrent")

#: (exponent bits, mantissa bits), largest finite magnitude code and NaN code of the float8 types.
FP8 = {
    "float8_e4m3fn": ((4, 3), 0x7E, 0x7F),
    "float8_e5m2": ((5, 2), 0x7B, 0x7E),
}
INT8_NAN = -128

_DTYPES = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "int8": np.dtype(np.int8),
}


class Quantised(NamedTuple):
    """A quantised state: ``values`` (the 8-bit dtype), ``scales`` (float32) and ``residual`` (or None)."""

    values: np.ndarray
    scales: np.ndarray
    residual: np.ndarray | None


def is_quant8(dtype: Any) -> bool:
    """Whether ``dtype`` (a ``numpy.dtype`` or name) is one of the 8-bit state dtypes."""
    try:
        return np.dtype(dtype).name in QUANT8_DTYPE_NAMES
    except TypeError:
        return False


def _name(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in QUANT8_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(QUANT8_DTYPE_NAMES)}, got {name}")
    return name


def group_scales(x: np.ndarray, dtype: Any) -> np.ndarray:
    """The scale of each group of the last axis: ``max(amax / qmax, 2**-126)``, NaN for a non-finite group.

    Args:
        x: ``[..., n]`` float32 values, one group per leading index.
        dtype: the 8-bit dtype (sets ``qmax``).

    Returns:
        ``[...]`` float32 scales.
    """
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    amax = np.max(np.where(finite, np.abs(x), np.float32(0)), axis=-1, initial=np.float32(0))
    scale = np.maximum(amax / np.float32(QMAX[_name(dtype)]), SCALE_FLOOR).astype(np.float32)
    return np.where(finite.all(axis=-1), scale, np.float32(np.nan)).astype(np.float32)


def conv_scales(window: np.ndarray, dtype: Any) -> np.ndarray:
    """Per (block of 64 channels, column) scales of conv windows.

    Args:
        window: ``[..., C, K]`` float32 conv windows.
        dtype: the 8-bit dtype.

    Returns:
        ``[..., ceil(C / 64), K]`` float32 scales (block ``j`` covers channels ``64 j .. 64 j + 63``).
    """
    window = np.asarray(window, dtype=np.float32)
    channels, blocks = window.shape[-2], -(-window.shape[-2] // CONV_BLOCK)
    pad = [(0, 0)] * (window.ndim - 2) + [(0, blocks * CONV_BLOCK - channels), (0, 0)]
    padded = np.pad(window, pad)  # zeros: they change no amax and no finiteness
    grouped = padded.reshape(*window.shape[:-2], blocks, CONV_BLOCK, window.shape[-1])
    return group_scales(np.swapaxes(grouped, -1, -2), dtype)


def expand_conv_scales(scales: np.ndarray, channels: int) -> np.ndarray:
    """``[..., ceil(C / 64), K]`` conv scales repeated to ``[..., C, K]`` (each channel its block's)."""
    return np.repeat(np.asarray(scales), CONV_BLOCK, axis=-2)[..., :channels, :]


def quantise_values(x: np.ndarray, scale: np.ndarray, dtype: Any, random: np.ndarray | None = None) -> np.ndarray:
    """Steps 2 and 3 of the rule: ``x / scale`` rounded to ``dtype`` and saturated.

    Args:
        x: float32 values.
        scale: float32 scales broadcastable to ``x`` (NaN: the element stores the NaN code).
        dtype: the 8-bit dtype.
        random: ``None`` to round to nearest even, or uint32 words of ``x``'s shape to round
            stochastically.

    Returns:
        ``x``'s shape, of ``dtype`` (``ml_dtypes`` float8 or int8).
    """
    name = _name(dtype)
    x = np.asarray(x, dtype=np.float32)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), x.shape)
    q = (x / scale).astype(np.float32)  # IEEE float32 division, one rounding
    nan = np.isnan(q) | np.isnan(scale)
    if name == "int8":
        if random is None:
            rounded = np.rint(q)
        else:
            u = (np.asarray(random).astype(np.uint64) >> np.uint64(8)).astype(np.float64) * 2.0**-24
            rounded = np.floor(q.astype(np.float64) + u)
        code = np.clip(np.where(nan, 0, rounded), -127, 127).astype(np.int8)
        return np.where(nan, np.int8(INT8_NAN), code).astype(np.int8)
    fmt, max_code, nan_code = FP8[name]
    bits = convert_bits(np.where(nan, np.float32(0), q).view(np.uint32), (8, 23), fmt, random, saturate=max_code)
    bits = np.where(nan, np.uint64(nan_code), bits)
    return bits.astype(np.uint8).view(_DTYPES[name])


def dequantise(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``stored * scale`` in float32 (int8's -128 and the float8 NaN codes give NaN).

    Args:
        values: 8-bit values (``ml_dtypes`` float8 or int8).
        scale: float32 scales broadcastable to ``values`` (for conv windows, expand them first with
            [`expand_conv_scales`][mamba_cache.precision.quant8.expand_conv_scales]).

    Returns:
        float32 array of the broadcast shape.
    """
    values = np.asarray(values)
    wide = values.astype(np.float32)
    if values.dtype == np.int8:
        wide = np.where(values == INT8_NAN, np.float32(np.nan), wide)
    return (wide * np.asarray(scale, dtype=np.float32)).astype(np.float32)


def recurrent_rounding_bits(seed: int, layer: Any, position: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Random words of recurrent states ``[*X, H, D, N]``: element index within the slot, kind 0.

    Args:
        seed: ``Config.rounding_seed``.
        layer: int array broadcastable to ``X``.
        position: int array broadcastable to ``X``: tokens each state has consumed.
        shape: ``(*X, H, D, N)``.

    Returns:
        uint32 words of ``shape``.
    """
    batch, elems = shape[:-3], int(np.prod(shape[-3:]))
    layer = np.broadcast_to(np.asarray(layer, np.int64), batch)
    position = np.broadcast_to(np.asarray(position, np.int64), batch)
    return rounding_bits(seed, layer, 0, position, elems).reshape(shape)


def conv_rounding_bits(seed: int, layer: Any, position: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Random words of conv windows ``[*X, C, K]`` after ``position`` tokens, kind 1.

    Column ``k`` entered the window as its last column after ``position - (K - 1 - k)`` tokens, and takes
    the words the window's elements ``(c, K - 1)`` had then: a column's words do not change as it shifts.

    Args:
        seed: ``Config.rounding_seed``.
        layer: int array broadcastable to ``X``.
        position: int array broadcastable to ``X``: tokens each window's state has consumed.
        shape: ``(*X, C, K)``.

    Returns:
        uint32 words of ``shape``.
    """
    batch, (channels, width) = shape[:-2], shape[-2:]
    layer = np.broadcast_to(np.asarray(layer, np.int64), batch)[..., None]
    position = np.broadcast_to(np.asarray(position, np.int64), batch)[..., None]
    entered = position - (width - 1 - np.arange(width))  # [*X, K]
    words = rounding_bits(seed, layer, KIND_CONV, entered, channels * width)  # [*X, K, C*K]
    words = words.reshape(*batch, width, channels, width)[..., width - 1]  # element (c, K - 1): [*X, K, C]
    return np.swapaxes(words, -1, -2).copy()


def quantise(
    x: np.ndarray,
    dtype: Any,
    *,
    layout: str = "recurrent",
    random: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    error_feedback: bool = False,
) -> Quantised:
    """Quantise float32 states to an 8-bit dtype with their scales (the whole rule of the module docstring).

    Args:
        x: float32 states: ``[..., H, D, N]`` (``layout="recurrent"``: groups over the last axis; any
            ``[..., n]`` works) or ``[..., C, K]`` conv windows (``layout="conv"``).
        dtype: ``"float8_e4m3fn"``, ``"float8_e5m2"`` or ``"int8"`` (or the ``numpy.dtype``).
        layout: ``"recurrent"`` or ``"conv"``.
        random: ``None`` for round-to-nearest-even, or uint32 words of ``x``'s shape for stochastic
            rounding ([`recurrent_rounding_bits`][mamba_cache.precision.quant8.recurrent_rounding_bits],
            [`conv_rounding_bits`][mamba_cache.precision.quant8.conv_rounding_bits] give the cache's words).
        residual: the error-feedback residual of the previous store (``x``'s shape, any float dtype),
            added to ``x`` in float32 first; implies ``error_feedback``.
        error_feedback: return the new residual (``RESIDUAL_DTYPE``), starting from zero when
            ``residual`` is None.

    Returns:
        ``Quantised(values, scales, residual)``: ``values`` of ``dtype`` and ``x``'s shape, ``scales``
        float32 ``[...]`` (recurrent: ``x.shape[:-1]``) or ``[..., ceil(C / 64), K]`` (conv), and the
        residual (``x``'s shape, bfloat16) or None.
    """
    if layout not in ("recurrent", "conv"):
        raise ValueError(f"layout must be 'recurrent' or 'conv', got {layout!r}")
    x = np.asarray(x, dtype=np.float32)
    if random is not None and np.shape(random) != x.shape:
        raise ValueError(f"random must have the shape of x, {x.shape}, got {np.shape(random)}")
    if residual is not None:
        if np.shape(residual) != x.shape:
            raise ValueError(f"residual must have the shape of x, {x.shape}, got {np.shape(residual)}")
        x = (x + np.asarray(residual).astype(np.float32)).astype(np.float32)
        error_feedback = True
    if layout == "recurrent":
        scales = group_scales(x, dtype)
        full = scales[..., None]
    else:
        scales = conv_scales(x, dtype)
        full = expand_conv_scales(scales, x.shape[-2])
    values = quantise_values(x, full, dtype, random)
    new_residual = None
    if error_feedback:
        error = (x - dequantise(values, full)).astype(np.float32)
        new_residual = convert(np.where(np.isnan(error), np.float32(0), error), RESIDUAL_DTYPE)
    return Quantised(values, scales, new_residual)


def store(
    x: np.ndarray,
    dtype: Any,
    *,
    layout: str = "recurrent",
    stochastic: bool = False,
    seed: int = 0,
    layer: Any = 0,
    position: Any = 0,
    residual: np.ndarray | None = None,
) -> Quantised:
    """What the cache stores for float32 states: [`quantise`][mamba_cache.precision.quant8.quantise] with its words.

    Args:
        x: ``[*X, H, D, N]`` recurrent states or ``[*X, C, K]`` conv windows (float32, or a wider or
            16-bit state dtype: converted to float32 first, to nearest even).
        dtype: the 8-bit dtype.
        layout: ``"recurrent"`` or ``"conv"``.
        stochastic: ``Config.stochastic_rounding``.
        seed: ``Config.rounding_seed``.
        layer: int array broadcastable to ``X``.
        position: int array broadcastable to ``X``: tokens each state has consumed.
        residual: the error-feedback residual of each state (``x``'s shape), or None (no feedback).

    Returns:
        ``Quantised(values, scales, residual)`` as ``quantise`` returns them.
    """
    x = np.asarray(x).astype(np.float32)
    random = None
    if stochastic:
        words = recurrent_rounding_bits if layout == "recurrent" else conv_rounding_bits
        random = words(seed, layer, position, x.shape)
    return quantise(x, dtype, layout=layout, random=random, residual=residual, error_feedback=residual is not None)


def shift_in_columns(window: np.ndarray, new: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Conv windows after ``shift`` more columns, the old ones moved and never rounded again.

    Column ``j`` of the result is ``window[..., j + s]`` when ``j < K - s`` (an old column, its bits
    or its scales moved), else ``new[..., j]`` (``new`` is the window after the ``s`` new columns as
    they were just stored: its last ``min(s, K)`` columns are the new ones).

    Args:
        window: ``[L, R, X, K]`` stored windows (values, or ``[L, R, ceil(C / 64), K]`` scales).
        new: the same shape and dtype: the windows after the step, freshly stored.
        shift: ``[R]`` ints >= 0: columns each row took in.

    Returns:
        ``[L, R, X, K]``, a new array.
    """
    width = window.shape[-1]
    j = np.arange(width)
    s = np.asarray(shift, np.int64)[:, None]  # [R, 1]
    index = np.where(j < width - s, j + s, width + j)[None, :, None, :]  # [1, R, 1, K]
    full = np.concatenate([window, new], axis=-1)
    return np.take_along_axis(full, np.broadcast_to(index, window.shape), axis=-1)


def within_one_step(values: np.ndarray, scales: np.ndarray, other: np.ndarray, other_scales: np.ndarray) -> bool:
    """Whether two stored recurrent states read back within one quantisation step of each other.

    How two backends' replays into an 8-bit state compare: their float32 inputs may differ by an
    ulp (a fused multiply-add), which may move a stored value by one step of its dtype's grid.

    Args:
        values: ``[..., N]`` 8-bit states (``ml_dtypes`` float8 or int8; their uint8 bits are viewed as
            ``other``'s dtype).
        scales: ``[...]`` their float32 scales.
        other: ``[..., N]`` the states to compare with, of the 8-bit dtype.
        other_scales: ``[...]`` their scales.

    Returns:
        True when every element's difference is at most one step: the scale (int8), or the float8
        grid's spacing at the value, no finer than its smallest subnormal, times the scale.
    """
    dtype = np.asarray(other).dtype
    a = dequantise(np.asarray(values).view(dtype), np.asarray(scales)[..., None])
    b = dequantise(other, np.asarray(other_scales)[..., None])
    scale = np.maximum(scales, other_scales)[..., None]
    if dtype.name == "int8":
        step = scale
    else:
        mantissa, tiny = (3, 2.0**-9) if dtype.name == "float8_e4m3fn" else (2, 2.0**-16)
        step = np.maximum(np.abs(b) / scale * 2.0**-mantissa, tiny) * scale
    return bool((np.abs(a - b) <= step * 1.0001).all())
