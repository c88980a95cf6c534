"""The 8-bit state reference (mamba_cache.precision.quant8) against independent oracles and its golden vectors."""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from helpers import REFERENCE, golden_generator

from mamba_cache.precision import quant8
from mamba_cache.precision.quant8 import QMAX, QUANT8_DTYPE_NAMES, SCALE_FLOOR

ML = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def spread(rng, shape, octaves=40):
    """float32 values with a random power-of-two magnitude per group (the last axis shares one)."""
    return (rng.standard_normal(shape) * np.exp2(rng.integers(-octaves, octaves, shape[:-1] + (1,)))).astype(np.float32)


def words(rng, shape):
    return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)


def fp8_grid(name):
    """Every non-negative finite value of a float8 type, ascending (float64)."""
    values = np.arange(128, dtype=np.uint8).view(ML[name]).astype(np.float64)
    return np.unique(values[np.isfinite(values)])


@pytest.mark.parametrize("name", QUANT8_DTYPE_NAMES)
def test_nearest_matches_ml_dtypes_and_rint(rng, name):
    x = spread(rng, (5, 3, 33))
    got = quant8.quantise(x, name)
    scale = np.maximum(np.abs(x).max(-1) / np.float32(QMAX[name]), SCALE_FLOOR).astype(np.float32)
    np.testing.assert_array_equal(got.scales, scale)
    q = (x / scale[..., None]).astype(np.float32)
    if name == "int8":
        expected = np.clip(np.rint(q), -127, 127).astype(np.int8)
    else:  # ml_dtypes rounds to nearest even; |q| past qmax only by one float32 rounding: clip first
        expected = np.clip(q, -QMAX[name], QMAX[name]).astype(ML[name])
    assert got.values.dtype.name == name
    assert got.values.view(np.uint8).tobytes() == expected.view(np.uint8).tobytes()
    assert np.isin(QMAX[name], np.abs(got.values.astype(np.float32))), "some group's largest element stores qmax"


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_stochastic_matches_an_exact_oracle(rng, name):
    """Up iff (|q| - lo) / ulp32 + (the word's bits below the target's place) reaches the next grid point."""
    x = spread(rng, (4, 64))
    x[0, :8] = np.float32(2.0**-133) * rng.standard_normal(8).astype(np.float32)  # subnormal-scale group's tail
    random = words(rng, x.shape)
    got = quant8.quantise(x, name, random=random).values.astype(np.float64)
    scale = quant8.group_scales(x, name)
    grid = fp8_grid(name)
    for q, r, out in zip((x / scale[:, None]).astype(np.float32).ravel(), random.ravel(), got.ravel(), strict=True):
        mag = Fraction(float(abs(q)))
        i = np.searchsorted(grid, float(mag), side="right") - 1
        lo = Fraction(grid[i])
        if i + 1 == grid.size:
            assert abs(out) == grid[-1]
            continue
        step = Fraction(grid[i + 1]) - lo
        ulp32 = Fraction(float(np.spacing(np.float32(abs(q))))) if q != 0 else step
        bits = int(np.log2(float(step / ulp32)))  # the bits below the target's last place
        frac = (mag - lo) / ulp32  # an integer below 2**bits
        add = int(r) >> (32 - bits) if bits <= 32 else int(r) << (bits - 32)
        expected = lo + (step if frac + add >= 2**bits else 0)
        assert abs(out) == float(expected) and (out == 0 or np.sign(out) == np.sign(q)), (q, r, out)


def test_int8_stochastic_is_floor_of_q_plus_u_exactly(rng):
    x = spread(rng, (4, 64))
    x[1, 3] = np.float32(-1e-30)  # q far below 2**-24: floor(q + u) is -1 only for u = 0
    random = words(rng, x.shape)
    random[1, 3] = 0xFF  # (r >> 8) = 0: u = 0
    got = quant8.quantise(x, "int8", random=random).values
    scale = quant8.group_scales(x, "int8")
    q = (x / scale[:, None]).astype(np.float32)
    for qi, r, out in zip(q.ravel(), random.ravel(), got.ravel(), strict=True):
        exact = Fraction(float(qi)) + Fraction(int(r) >> 8, 2**24)
        assert out == max(-127, min(127, exact.numerator // exact.denominator)), (qi, r, out)
    assert got[1, 3] == -1


@pytest.mark.parametrize("name", QUANT8_DTYPE_NAMES)
def test_stochastic_rounding_is_unbiased_and_brackets_the_value(rng, name):
    x = np.broadcast_to(spread(rng, (1, 16), octaves=8), (4000, 16)).copy()
    x[:, 0] = x[0].max() * 2  # the group's amax: a fixed scale for all rows
    scale = quant8.group_scales(x, name)[:, None]
    deq = quant8.dequantise(quant8.quantise(x, name, random=words(rng, x.shape)).values, scale)
    near = quant8.dequantise(quant8.quantise(x, name).values, scale)
    # every result is one of the two neighbours of x; the mean converges to x
    step = np.abs(near[0] - x[0]) * 2 + np.spacing(np.abs(x[0])) * 4
    assert (np.abs(deq - x) <= np.maximum(step, np.abs(deq - near) + np.abs(near - x))).all()
    spread_ = np.abs(np.diff(np.sort(deq, axis=0)[[0, -1]], axis=0))[0]  # the two neighbours' distance
    assert (np.abs(deq.astype(np.float64).mean(0) - x[0]) <= 4 * spread_ / np.sqrt(4000)).all()
    assert (deq.min(0) <= x[0]).all() and (deq.max(0) >= x[0]).all()


@pytest.mark.parametrize("name", QUANT8_DTYPE_NAMES)
def test_edge_groups(name):
    nan_code = {"float8_e4m3fn": 0x7F, "float8_e5m2": 0x7E, "int8": 0x80}[name]
    x = np.zeros((6, 8), np.float32)
    x[0, 2], x[1, 5] = np.nan, -np.inf
    x[2] = [0, -0.0, 0, 0, 0, 0, -0.0, 0]
    x[3] = np.float32(2.0**-140) * np.arange(1, 9)  # amax / qmax is subnormal: the scale floors
    x[4] = [QMAX[name], -QMAX[name], 1, 2, 3, 4, 5, 6]
    x[5] = [np.float32(3.4e38), -np.float32(3.4e38), 1e30, 0, 0, 0, 0, 0]
    got = quant8.quantise(x, name, error_feedback=True)
    assert np.isnan(got.scales[:2]).all()
    assert (got.values.view(np.uint8)[:2] == nan_code).all()
    assert np.isnan(quant8.dequantise(got.values[:2], got.scales[:2, None])).all()
    assert (got.residual[:2].astype(np.float32) == 0).all(), "a NaN group leaves a zero residual"
    assert got.scales[2] == SCALE_FLOOR and got.scales[3] == SCALE_FLOOR
    assert (got.values[2].astype(np.float32) == 0).all()
    deq = quant8.dequantise(got.values, got.scales[:, None])
    np.testing.assert_array_equal(deq[2], 0)
    assert (np.abs(deq[3] - x[3]) <= SCALE_FLOOR * (0.5 if name == "int8" else 2.0**-9)).all()
    assert got.scales[4] == 1 and (deq[4, :2] == x[4, :2]).all(), "qmax itself is stored exactly at scale 1"
    assert np.isfinite(got.scales[5]) and (np.abs(got.values[5].astype(np.float32)[:2]) == QMAX[name]).all()


@pytest.mark.parametrize("name", QUANT8_DTYPE_NAMES)
def test_quotients_past_qmax_saturate(name):
    """A scale rounded down makes amax / scale exceed qmax by a rounding: both roundings saturate."""
    x = np.array([[QMAX[name] * 1.0000001, 1.0]], np.float32)
    scale = np.float32(0.99999994)  # forces |q| past qmax
    for random in (None, np.full(x.shape, 0xFFFFFFFF, np.uint32)):
        stored = quant8.quantise_values(x, scale, name, random)
        assert stored.astype(np.float32)[0, 0] == QMAX[name]
        assert quant8.quantise_values(-x, scale, name, random).astype(np.float32)[0, 0] == -QMAX[name]


def test_conv_groups_are_per_column_and_block_of_64(rng):
    window = spread(rng, (2, 70, 4), octaves=20)  # 70 channels: a full block and a short one
    got = quant8.quantise(window, "float8_e4m3fn", layout="conv")
    assert got.scales.shape == (2, 2, 4)
    for block, channels in enumerate((slice(0, 64), slice(64, 70))):
        one = quant8.group_scales(np.swapaxes(window[:, channels], -1, -2), "float8_e4m3fn")
        np.testing.assert_array_equal(got.scales[:, block], one)
    moved = window.copy()
    moved[0, 65, 3] *= 1000  # only (slot 0, block 1, column 3) changes its scale and values
    again = quant8.quantise(moved, "float8_e4m3fn", layout="conv")
    changed = again.scales != got.scales
    assert changed[0, 1, 3] and changed.sum() == 1
    assert (again.values.view(np.uint8) != got.values.view(np.uint8))[:, :64].sum() == 0


def test_conv_words_stay_with_a_column_as_the_window_shifts():
    shape = (3, 5, 4)
    before = quant8.conv_rounding_bits(9, 2, np.array([10, 11, 12]), shape)
    after = quant8.conv_rounding_bits(9, 2, np.array([11, 12, 13]), shape)
    np.testing.assert_array_equal(after[..., :-1], before[..., 1:])
    assert (after[..., -1] != before[..., -1]).all()
    recurrent = quant8.recurrent_rounding_bits(9, 2, np.array([10, 11]), (2, 2, 3, 4))
    np.testing.assert_array_equal(
        recurrent.reshape(2, -1), quant8.rounding_bits(9, np.array([2, 2]), 0, np.array([10, 11]), 24)
    )


def test_error_feedback_carries_the_residual_and_cancels_the_bias(rng):
    """Re-storing the same value with error feedback: the running mean of what is stored converges to it."""
    x = spread(rng, (3, 32), octaves=4)
    x[:, 0] = 100 * np.abs(x).max()  # a large element keeps the int8 step coarse for the others
    got = quant8.quantise(x, "int8", error_feedback=True)
    deq = quant8.dequantise(got.values, got.scales[:, None])
    np.testing.assert_array_equal(got.residual, quant8.convert((x - deq).astype(np.float32), quant8.RESIDUAL_DTYPE))
    residual, total = None, np.zeros(x.shape, np.float64)
    for _ in range(64):
        step = quant8.quantise(x, "int8", residual=residual, error_feedback=True)
        residual = step.residual
        total += quant8.dequantise(step.values, step.scales[:, None])
    plain_error = np.abs(deq - x)[:, 1:].mean()
    fed_error = np.abs(total / 64 - x)[:, 1:].mean()
    assert fed_error < plain_error / 8, (fed_error, plain_error)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float16"}, "dtype must be one of float8_e4m3fn"),
        ({"layout": "rows"}, "layout must be 'recurrent' or 'conv'"),
        ({"random": np.zeros((2, 3), np.uint32)}, "random must have the shape of x"),
        ({"residual": np.zeros(3, np.float32)}, "residual must have the shape of x"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"x": np.ones((2, 4), np.float32), "dtype": "int8", **kwargs}
    with pytest.raises(ValueError, match=match):
        quant8.quantise(**args)


def test_conversion_golden_vectors_cover_the_edges_and_reproduce():
    committed = np.load(REFERENCE / "quant8-conversions.npz")
    fresh = golden_generator().quant8_vectors()
    assert sorted(committed.files) == sorted(fresh)
    for key, value in fresh.items():
        assert committed[key].tobytes() == value.tobytes(), key
    x = committed["recurrent_x"]
    assert np.isnan(x).any() and np.isinf(x).any() and (np.abs(x[np.isfinite(x)]) < 2.0**-126).any()
    for name in QUANT8_DTYPE_NAMES:
        for rounding in ("nearest", "stochastic"):
            stored = committed[f"{name}_recurrent_{rounding}_values"].view(quant8._DTYPES[name]).astype(np.float32)
            scales = committed[f"{name}_recurrent_{rounding}_scales"]
            assert np.isnan(scales).any() and (scales == SCALE_FLOOR).any()
            assert (np.abs(stored[np.isfinite(stored)]) == QMAX[name]).any(), "a saturated value"
            assert (stored == 0).any()


@pytest.mark.parametrize("name", QUANT8_DTYPE_NAMES)
def test_within_one_step_accepts_an_ulp_and_refuses_two_steps(rng, name):
    x = spread(rng, (6, 32), octaves=6)
    near = quant8.quantise(x, name)
    nudged = quant8.quantise((x * np.float32(1 + 2**-23)).astype(np.float32), name)  # one float32 ulp up
    assert quant8.within_one_step(nudged.values, nudged.scales, near.values, near.scales)
    moved = near.values.view(np.uint8).copy()
    moved[2, 5] = moved[2, 5] + 2 if moved[2, 5] % 128 < 100 else moved[2, 5] - 2  # two grid steps away
    assert not quant8.within_one_step(moved.view(near.values.dtype), near.scales, near.values, near.scales)
