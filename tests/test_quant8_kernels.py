"""The 8-bit device functions (mamba_cache.precision.quant8_kernels) against the NumPy reference, bit for bit.

Under the CUDA simulator these run Python arithmetic; on the GPU machine the same tests run the compiled
kernels (``div.rn.f32``, the integer conversion, float64 rounding), which is what the bit-for-bit claim is
about there.
"""

import numpy as np
import pytest
from helpers import REFERENCE
from numba import cuda

from mamba_cache.precision import quant8
from mamba_cache.precision import quant8_kernels as kernels
from mamba_cache.precision.quant8 import CONV_BLOCK, QUANT8_DTYPE_NAMES


def device_quantise(rows, random, dtype, stochastic):
    """``quantise_rows`` on the device: ``[G, n]`` float32 groups -> (bytes ``[G, n]``, scales ``[G]``)."""
    values = cuda.device_array(rows.shape, np.uint8)
    scales = cuda.device_array(rows.shape[0], np.float32)
    grid = (rows.shape[0] + 31) // 32
    kernels.quantise_rows[grid, 32](
        values,
        scales,
        cuda.to_device(np.ascontiguousarray(rows)),
        cuda.to_device(np.ascontiguousarray(random)),
        kernels.dtype_code(dtype),
        int(stochastic),
    )
    return values.copy_to_host(), scales.copy_to_host()


def conv_groups(window):
    """``[..., C, K]`` -> ``[G, 64]`` rows, one per (block, column), zero-padded: the conv scale groups."""
    channels, width = window.shape[-2:]
    blocks = -(-channels // CONV_BLOCK)
    pad = np.zeros((*window.shape[:-2], blocks * CONV_BLOCK, width), window.dtype)
    pad[..., :channels, :] = window
    grouped = np.swapaxes(pad.reshape(*window.shape[:-2], blocks, CONV_BLOCK, width), -1, -2)
    return grouped.reshape(-1, CONV_BLOCK), grouped.shape, pad.shape


def conv_ungroup(rows, grouped_shape, pad_shape, channels):
    return np.swapaxes(rows.reshape(grouped_shape), -1, -2).reshape(pad_shape)[..., :channels, :]


@pytest.mark.parametrize("dtype", QUANT8_DTYPE_NAMES)
@pytest.mark.parametrize("layout", ["recurrent", "conv"])
def test_device_quantisation_reproduces_the_golden_vectors(dtype, layout):
    golden = np.load(REFERENCE / "quant8-conversions.npz")
    x, words = golden[f"{layout}_x"], golden[f"{layout}_random"]
    for rounding in ("nearest", "stochastic"):
        expected_values = golden[f"{dtype}_{layout}_{rounding}_values"]
        expected_scales = golden[f"{dtype}_{layout}_{rounding}_scales"]
        if layout == "recurrent":
            values, scales = device_quantise(
                x.reshape(-1, x.shape[-1]), words.reshape(-1, x.shape[-1]), dtype, rounding == "stochastic"
            )
        else:
            rows, grouped, pad = conv_groups(x)
            random_rows = conv_groups(words)[0]
            values, scales = device_quantise(rows, random_rows, dtype, rounding == "stochastic")
            values = conv_ungroup(values, grouped, pad, x.shape[-2])
        assert values.tobytes() == expected_values.tobytes(), rounding
        assert scales.tobytes() == expected_scales.tobytes(), rounding


@pytest.mark.parametrize("dtype", QUANT8_DTYPE_NAMES)
def test_device_quantisation_matches_the_reference_on_random_groups(rng, dtype):
    x = (rng.standard_normal((24, 40)) * np.exp2(rng.integers(-140, 120, (24, 1)))).astype(np.float32)
    x[3, 7] = np.nan
    x[5] = 0.0
    words = rng.integers(0, 2**32, x.shape, dtype=np.uint64).astype(np.uint32)
    for stochastic in (False, True):
        expected = quant8.quantise(x, dtype, random=words if stochastic else None)
        values, scales = device_quantise(x, words, dtype, stochastic)
        assert values.tobytes() == expected.values.view(np.uint8).tobytes(), stochastic
        assert scales.tobytes() == expected.scales.tobytes(), stochastic


@cuda.jit
def dequantise_all(out, scales, code):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = kernels.dequantise_code(i % 256, scales[i], code)


@pytest.mark.parametrize("dtype", QUANT8_DTYPE_NAMES)
def test_device_dequantisation_of_every_byte(rng, dtype):
    scales = np.concatenate([np.float32([1.0, 2.0**-126, 3.5e30]), rng.uniform(1e-3, 10, 253).astype(np.float32)])
    stored = np.arange(256, dtype=np.uint8).view(quant8._DTYPES[dtype])
    expected = quant8.dequantise(stored, scales)
    out = cuda.device_array(256, np.float32)
    dequantise_all[8, 32](out, cuda.to_device(scales), kernels.dtype_code(dtype))
    got = out.copy_to_host()
    nan = np.isnan(expected)
    assert (np.isnan(got) == nan).all() and got[~nan].tobytes() == expected[~nan].tobytes()
