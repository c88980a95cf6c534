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


@pytest.mark.slow  # NVVM over three kernels in a subprocess: 15 s of compiles
def test_8bit_commit_and_replay_kernels_compile_for_the_gpu():
    """commit8, replay8_mamba2 and replay8_gdn compile to sm_90 PTX (no GPU needed) with the argument types the
    backend launches them with (int32 positions for a replay, int64 for the checkpoint fold and reads): the
    simulator runs Python and would not notice a kernel NVVM refuses (a local array sized by an expression)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import types as pytypes
        from numba import cuda, types
        import numba.cuda.dispatcher as dispatcher
        dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
        from mamba_cache.precision import quant8_kernels as q8k, quant8_replay as q8r
        u8, f32, u16, i32, i64 = types.uint8, types.float32, types.uint16, types.int32, types.int64
        A = lambda t, n: types.Array(t, n, "C")
        main = (A(u8, 4), A(f32, 3), A(u16, 4), A(u8, 4), A(f32, 4))  # values, scales, residual; conv, scales
        rows = (A(i32, 1), A(i32, 2), A(i32, 1))
        track = (*main, A(i32, 1), A(i32, 1))
        mamba2 = (A(f32, 3), A(f32, 3), A(f32, 4))
        gdn = (A(f32, 3), A(f32, 3), A(f32, 4), A(f32, 4))
        for name, kernel, fields in (("mamba2", q8r.replay8_mamba2, mamba2), ("gdn", q8r.replay8_gdn, gdn)):
            for positions in (A(i32, 1), A(i64, 1)):
                sig = (*main, *fields, A(u8, 3), A(f32, 3), *rows, positions, *track, *(i64,) * 15)
                cuda.compile_ptx(kernel.py_func, sig, device=False, cc=(9, 0))
                print(name, positions.dtype)
        inter = (A(f32, 4), A(f32, 3), A(u8, 4), A(f32, 4), A(u16, 4), A(f32, 4))  # per-step float32 / bfloat16
        sig = (*main[:3], *inter[:2], *main[3:], *inter[4:], *main, *rows, *(A(i32, 1),) * 3, *(i64,) * 16)
        cuda.compile_ptx(q8k.commit8.py_func, sig, device=False, cc=(9, 0))
        print("commit8")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:5] == ["mamba2 int32", "mamba2 int64", "gdn int32", "gdn int64", "commit8"]
