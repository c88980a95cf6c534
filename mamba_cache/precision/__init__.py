"""Precision options: bfloat16 states, mixed main / per-step dtypes, stochastic rounding, 8-bit states.

[`mamba_cache.precision.reference`][mamba_cache.precision.reference] is the NumPy definition (conversions as integer
arithmetic on bit patterns, Philox4x32-10); `mamba_cache.precision.kernels` repeats it in Numba device functions
(imported lazily: this package does not import numba). [`mamba_cache.precision.quant8`][mamba_cache.precision.quant8]
defines the 8-bit states (float8_e4m3fn, float8_e5m2, int8 with float32 scales per group).
"""

from .quant8 import QUANT8_DTYPE_NAMES, Quantised, dequantise, is_quant8, quantise
from .reference import (
    FORMATS,
    STATE_DTYPE_NAMES,
    bfloat16,
    convert,
    convert_bits,
    dtype_format,
    philox4x32_10,
    rounding_bits,
    rounds_stochastically,
    storage_dtype,
)

__all__ = [
    "FORMATS",
    "QUANT8_DTYPE_NAMES",
    "Quantised",
    "STATE_DTYPE_NAMES",
    "bfloat16",
    "convert",
    "convert_bits",
    "dequantise",
    "dtype_format",
    "is_quant8",
    "philox4x32_10",
    "quantise",
    "rounding_bits",
    "rounds_stochastically",
    "storage_dtype",
]
