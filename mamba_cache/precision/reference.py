"""The NumPy reference of the precision options: dtype conversion on bit patterns, and Philox4x32-10.

Every conversion between the four state dtypes (float16, bfloat16, float32, float64) is written as
integer arithmetic on the bit patterns, so the Numba device functions in
`mamba_cache.precision.kernels`, which repeat the same arithmetic line for line, give the
same bits on the GPU as this module gives on the host (no dependence on the hardware's float
conversion instructions, their rounding mode or their NaN handling).

A format is ``(e, m)``: exponent bits and stored mantissa bits.

    float16  (5, 10)    bfloat16 (8, 7)    float32 (8, 23)    float64 (11, 52)

The conversion ([`convert_bits`][mamba_cache.precision.reference.convert_bits]), for a finite non-zero source:

1. normalise: ``value = sig * 2**(u - m_src)`` with ``sig`` in ``[2**m_src, 2**(m_src + 1))``
   (source subnormals are normalised with a leading-bit count);
2. target exponent field ``e_d = u + bias_dst``. If ``e_d >= 1`` (normal) take
   ``A = e_d << m_src | (sig - 2**m_src)`` and drop ``s = m_src - m_dst`` bits; else (subnormal)
   take ``A = sig`` and drop ``s = m_src - m_dst + 1 - e_d`` bits. ``s <= 0`` (widening) is an
   exact left shift. A carry out of the mantissa increments the exponent field, as it should;
3. round the dropped bits: to nearest, ties to even (the default), or stochastically: add a
   uniform random integer below the target's last place (the top ``s`` bits of a 32-bit random
   word, or the word shifted up when ``s > 32``) and truncate. More than 62 dropped bits give zero;
4. a result at or past the infinity code is infinity. Zeros keep their sign; infinities stay
   infinities; a NaN becomes the quiet NaN of the target with the sign and the top payload bits.

Stochastic rounding is unbiased: ``E[result] = value`` for every value in range.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) maps a
128-bit counter and a 64-bit key to 128 random bits; the products are formed exactly in uint64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "FORMATS",
    "STATE_DTYPE_NAMES",
    "bfloat16",
    "convert",
    "convert_bits",
    "dtype_format",
    "philox4x32_10",
    "rounding_bits",
    "rounds_stochastically",
    "storage_dtype",
]

try:  # ml_dtypes gives NumPy a bfloat16 dtype; it is a core dependency, but stay importable without it
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    bfloat16 = None

#: The state dtypes, in the order error messages list them.
STATE_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
#: (exponent bits, stored mantissa bits) of each state dtype.
FORMATS = {"float16": (5, 10), "bfloat16": (8, 7), "float32": (8, 23), "float64": (11, 52)}

#: Philox4x32 round multipliers and Weyl key increments (Random123).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
#: State-kind numbers in the stochastic-rounding counter.
KIND_RECURRENT, KIND_CONV = 0, 1

_U32 = np.uint64(0xFFFFFFFF)


def rounds_stochastically(stochastic: bool, target: Any, source: Any = np.float32) -> bool:
    """Whether a ``source`` value stored into a ``target`` pool rounds stochastically: the one rule.

    So it does when the config asks for stochastic rounding (``stochastic``) and a value of 4 or
    more bytes (a float32 computed step, a float32 / float64 per-step state) is stored into a
    2-byte pool (float16, bfloat16), or any wider value into an 8-bit pool (float8, int8:
    [`mamba_cache.precision.quant8`][mamba_cache.precision.quant8]); every other store rounds to
    nearest even (or copies).
    """
    size, wide = np.dtype(target).itemsize, np.dtype(source).itemsize
    return bool(stochastic) and ((size == 2 and wide >= 4) or (size == 1 and wide >= 2))


def dtype_format(dtype: Any) -> tuple[int, int]:
    """``(exponent bits, mantissa bits)`` of a state dtype (``numpy.dtype`` or name)."""
    return FORMATS[np.dtype(dtype).name]


def storage_dtype(dtype: Any) -> np.dtype:
    """The dtype a device array stores ``dtype`` as: uint16 raw bits for bfloat16, else itself.

    Numba device arrays have no bfloat16 type, so the Numba backend keeps bfloat16 pools as uint16
    arrays of the raw bits (and ``__cuda_array_interface__`` cannot express bfloat16 either).
    """
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of every counter, vectorised.

    Args:
        counter: ``[..., 4]`` unsigned integers < 2**32 (the 128-bit counter, word 0 first).
        key: ``[..., 2]`` unsigned integers < 2**32, broadcast against ``counter[..., :2]``.

    Returns:
        ``[..., 4]`` uint32: the random words.
    """
    c = [np.asarray(counter, dtype=np.uint64)[..., i] for i in range(4)]
    k0 = np.asarray(key, dtype=np.uint64)[..., 0]
    k1 = np.asarray(key, dtype=np.uint64)[..., 1]
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for round_ in range(10):
        if round_:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _U32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _U32
        p0, p1 = m0 * c[0], m1 * c[2]  # exact: both factors < 2**32
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _U32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _U32,
        ]
    return np.stack(c, axis=-1).astype(np.uint32)


def rounding_bits(seed: int, layer: Any, kind: int, position: Any, elems: int) -> np.ndarray:
    """The stochastic-rounding random words of whole slots.

    Element ``e`` of the slot of layer ``layer``, state kind ``kind`` (0 recurrent, 1 conv), whose
    state has consumed ``position`` tokens, takes word ``e % 4`` of
    ``Philox4x32-10(counter=(e // 4, position, layer, kind), key=(seed & 0xFFFFFFFF, seed >> 32))``.
    The slot, the batch row and the draft step are not inputs: a state gets the same bits wherever
    it was computed.

    Args:
        seed: ``Config.rounding_seed``, in ``[0, 2**64)``.
        layer: int array (any shape ``X``) of layer indices.
        kind: 0 (recurrent) or 1 (conv).
        position: int array broadcastable to ``X``: tokens consumed (taken modulo 2**32).
        elems: elements per slot.

    Returns:
        ``[*X, elems]`` uint32.
    """
    layer, position = np.broadcast_arrays(np.asarray(layer, np.int64), np.asarray(position, np.int64))
    groups = -(-elems // 4)
    shape = (*layer.shape, groups)
    counter = np.empty((*shape, 4), dtype=np.uint64)
    counter[..., 0] = np.arange(groups, dtype=np.uint64)
    counter[..., 1] = (position & 0xFFFFFFFF).astype(np.uint64)[..., None]
    counter[..., 2] = (layer & 0xFFFFFFFF).astype(np.uint64)[..., None]
    counter[..., 3] = kind
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    return philox4x32_10(counter, key).reshape(*layer.shape, groups * 4)[..., :elems]


def _bit_length(man: np.ndarray) -> np.ndarray:
    """Index of the highest set bit of each uint64 (0 for 0 and 1), by binary search."""
    m = man.copy()
    lead = np.zeros(man.shape, dtype=np.int64)
    for step in (32, 16, 8, 4, 2, 1):
        big = (m >> np.uint64(step)) != 0
        lead += np.where(big, step, 0)
        m = np.where(big, m >> np.uint64(step), m)
    return lead


def convert_bits(
    bits: np.ndarray,
    src: tuple[int, int],
    dst: tuple[int, int],
    random: np.ndarray | None = None,
    saturate: int | None = None,
) -> np.ndarray:
    """Convert bit patterns of format ``src`` to format ``dst`` (see the module docstring).

    Args:
        bits: unsigned integer array of ``src`` bit patterns.
        src: ``(exponent bits, mantissa bits)`` of the source.
        dst: ``(exponent bits, mantissa bits)`` of the target.
        random: ``None`` to round to nearest even, or uint32 words of ``bits``'s shape to round
            stochastically.
        saturate: ``None`` for an IEEE target (a result at or past the infinity code is infinity),
            or the largest finite magnitude code of a saturating 8-bit target
            ([`mamba_cache.precision.quant8`][mamba_cache.precision.quant8]): a finite result past it
            becomes it. The exponent field then runs on past the IEEE range (float8_e4m3fn keeps
            finite values at exponent field 15), which the rounding steps already do.

    Returns:
        uint64 array of ``dst`` bit patterns, ``bits``'s shape.
    """
    u64 = np.uint64
    se, sm = src
    de, dm = dst
    x = np.asarray(bits).astype(u64)
    sign = (x >> u64(se + sm)) & u64(1)
    exp = ((x >> u64(sm)) & u64((1 << se) - 1)).astype(np.int64)
    man = x & u64((1 << sm) - 1)
    s_bias, d_bias = (1 << (se - 1)) - 1, (1 << (de - 1)) - 1
    inf_code = u64(((1 << de) - 1) << dm)
    # 1. normalise (subnormal sources: shift the leading one up to the implicit bit)
    lead = _bit_length(man)
    sub = exp == 0
    sig = np.where(sub, man << (sm - lead).astype(u64), man | u64(1 << sm))
    unbiased = np.where(sub, lead - sm + 1 - s_bias, exp - s_bias)
    # 2. the target exponent field, what to round and by how many bits
    e_d = unbiased + d_bias
    normal = e_d >= 1
    a = np.where(normal, (np.maximum(e_d, 0).astype(u64) << u64(sm)) | (sig & u64((1 << sm) - 1)), sig)
    shift = np.where(normal, sm - dm, sm - dm + 1 - e_d)
    # 3. round off `shift` bits (or widen: shift <= 0 is an exact left shift)
    s = np.clip(shift, 0, 62).astype(u64)
    if random is None:
        q = a >> s
        rem = a & ((u64(1) << s) - u64(1))
        half = np.where(s > 0, u64(1) << np.maximum(s, u64(1)) - u64(1), u64(0))
        up = (s > 0) & ((rem > half) | ((rem == half) & ((q & u64(1)) == 1)))
        q = q + up.astype(u64)
    else:
        r = np.asarray(random).astype(u64)
        add = np.where(s <= 32, r >> (u64(32) - np.minimum(s, u64(32))), r << (np.maximum(s, u64(32)) - u64(32)))
        q = (a + add) >> s
    q = np.where(shift > 62, u64(0), q)
    result = np.where(shift <= 0, a << np.clip(-shift, 0, 63).astype(u64), q)
    # 4. overflow, zeros, infinities and NaNs
    result = np.minimum(result, inf_code if saturate is None else u64(saturate))
    result = np.where(sub & (man == 0), u64(0), result)
    special = exp == (1 << se) - 1
    payload = man >> u64(sm - dm) if sm >= dm else man << u64(dm - sm)
    nan = inf_code | u64(1 << (dm - 1)) | payload
    result = np.where(special, np.where(man == 0, inf_code, nan), result)
    return result | (sign << u64(de + dm))


def convert(
    values: np.ndarray,
    dtype: Any,
    *,
    stochastic: bool = False,
    seed: int = 0,
    kind: int = KIND_RECURRENT,
    layer: Any = None,
    position: Any = None,
) -> np.ndarray:
    """Convert whole slots of states to ``dtype``, the way the cache stores them.

    Rounds to nearest even, or stochastically when ``stochastic`` is set and a 4- or 8-byte value is stored into a
    2-byte dtype ([`rounding_bits`][mamba_cache.precision.reference.rounding_bits] gives the random words). Equal dtypes
    return an exact copy of the bits.

    Args:
        values: ``[*X, elems]`` states of any state dtype (host NumPy), one slot per ``X`` index.
        dtype: the target state dtype.
        stochastic: ``Config.stochastic_rounding``.
        seed: ``Config.rounding_seed``.
        kind: 0 for recurrent states, 1 for conv states.
        layer: int array broadcastable to ``X``: the layer of each slot (needed when stochastic).
        position: int array broadcastable to ``X``: tokens each state has consumed (likewise).

    Returns:
        ``[*X, elems]`` array of ``dtype``.
    """
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values.copy()
    src_size, dst_size = values.dtype.itemsize, dtype.itemsize
    bits = values.view(f"u{src_size}")
    random = None
    if rounds_stochastically(stochastic, dtype, values.dtype):
        batch = values.shape[:-1]
        layer = np.broadcast_to(np.asarray(layer, np.int64), batch)
        random = rounding_bits(
            seed, layer, kind, np.broadcast_to(np.asarray(position, np.int64), batch), values.shape[-1]
        )
    out = convert_bits(bits, dtype_format(values.dtype), dtype_format(dtype), random)
    return out.astype(f"u{dst_size}").view(dtype)
