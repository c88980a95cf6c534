"""Precision options: bfloat16 states, mixed main / per-step dtypes, stochastic rounding.

[`mamba_cache.precision.reference`][mamba_cache.precision.reference] is the NumPy definition (conversions as integer
arithmetic on bit patterns, Philox4x32-10); `mamba_cache.precision.kernels` repeats it in Numba device functions
(imported lazily: this package does not import numba).
"""

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
