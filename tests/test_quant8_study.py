"""The 8-bit quality study (benchmarks/quant8_study.py): its fast step, stores and commits are the library's."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import SEED  # noqa: E402

from benchmarks import quant8_stores as stores  # noqa: E402
from benchmarks import quant8_study as study  # noqa: E402
from mamba_cache import NumpyMambaCacheManager  # noqa: E402
from mamba_cache.precision import bfloat16, convert, quant8  # noqa: E402
from mamba_cache.precision.reference import rounding_bits  # noqa: E402


def wide_range(rng, shape):
    """Float32 values over 16 decades (the float8 subnormal grids included), with zero groups and signed zeros."""
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-14, 2, shape)).astype(np.float32)
    x[0] = 0
    x[1, :3] = -0.0
    return x


@pytest.mark.parametrize("name", quant8.QUANT8_DTYPE_NAMES)
def test_fast_stores_are_the_librarys_bit_for_bit(rng, name):
    x = wide_range(rng, (40, 128))
    words = rng.integers(0, 2**32, x.shape, dtype=np.uint64).astype(np.uint32)
    residual = convert(wide_range(rng, x.shape) * np.float32(1e-3), bfloat16).astype(np.float32)
    for stochastic in (False, True):
        for feedback in (False, True):
            got, res = x.copy(), residual.copy() if feedback else None
            fp8_words = words if stochastic and name != "int8" else None
            uniform = study.uniform(words) if stochastic and name == "int8" else None
            stores.store8(got, name, fp8_words, uniform, res)
            q = quant8.quantise(x, name, random=words if stochastic else None, residual=residual if feedback else None)
            want = quant8.dequantise(q.values, q.scales[..., None])
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, stochastic, feedback)
            if feedback:
                assert np.array_equal(res.view(np.uint32), q.residual.astype(np.float32).view(np.uint32))
    for dtype in ("bfloat16", "float16"):
        got = x.copy()
        stores.round16(got, dtype)
        want = convert(x, bfloat16 if dtype == "bfloat16" else dtype).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), dtype


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_fast_layer_is_the_models_decode_step(rng, mixer):
    sizes = study.QUICK[mixer]
    model = study.make_model(mixer, sizes)
    cache = NumpyMambaCacheManager(study.config(mixer, sizes, rows=3))
    fast = study.FastLayer(model)
    group = study.Group(fast, ("float32", False, False), 3)
    for _ in range(12):
        tokens = rng.integers(0, study.VOCAB, 3)
        out = model.decode_step(cache, tokens)
        logits = fast.step(group, tokens)
        emb = model.weights["embedding"]
        np.testing.assert_allclose(logits, (out - emb[tokens]) @ emb.T, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(group.rec, cache.get_recurrent_state(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(group.conv, cache.get_conv_state(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,stochastic,feedback", [("int8", True, True), ("float8_e4m3fn", False, False)])
def test_store_and_commit_are_the_managers(rng, dtype, stochastic, feedback):
    """Per-token store and a speculative commit of a steps give what the manager's 8-bit pool reads back as."""
    sizes = study.QUICK["mamba2"]
    rows, verify = 3, study.VERIFY
    fast = study.FastLayer(study.make_model("mamba2", sizes))
    for inter, accepted, position in (("float32", 1, 41), (bfloat16, 3, 17), (bfloat16, 4, 9)):
        pool = NumpyMambaCacheManager(study.config("mamba2", sizes, rows, dtype, inter, verify, stochastic, feedback))
        pool.reshape_intermediate_states(rows, verify)
        group = study.Group(fast, (dtype, stochastic, feedback), rows)
        rec = (rng.standard_normal(pool.get_intermediate_recurrent_state(0).shape) * 3).astype(np.float32)
        conv = rng.standard_normal(pool.get_intermediate_conv_state(0).shape).astype(np.float32)
        pool.get_intermediate_recurrent_state(0)[...] = rec
        pool.get_intermediate_conv_state(0)[...] = conv
        a = accepted - 1
        group.rec[...] = rec[:, a]
        group.conv[...] = conv[:, a]
        group.conv[:, :, : study.KERNEL - accepted] = 0  # the old columns: the pool's, zero
        pool.scatter_mtp_states(np.full(rows, accepted, np.int32), positions=np.full(rows, position, np.int32))
        words = [study.Words(fast, position + accepted - j, stochastic) for j in range(study.KERNEL)]
        if inter == "float32":  # the per-token store
            group.words = words[0]
            group.store_block(group, slice(None))
            group.store_columns(1, words)
        else:
            group.commit(fast, accepted, words)
        want = quant8.dequantise(pool.get_recurrent_state(0), pool.get_recurrent_scales(0)[..., None])
        scales = quant8.expand_conv_scales(pool.get_conv_scales(0), pool.get_conv_state(0).shape[1])
        assert np.array_equal(group.rec, want), (inter, accepted)
        assert np.array_equal(group.conv, quant8.dequantise(pool.get_conv_state(0), scales)), (inter, accepted)
        if feedback:
            assert np.array_equal(group.residual, pool.get_recurrent_residual(0).astype(np.float32))


def test_words_are_the_caches():
    fast = study.FastLayer(study.make_model("gdn", study.QUICK["gdn"]))
    words = study.Words(fast, 7, True)
    elems = fast.heads * fast.dim * fast.size
    assert np.array_equal(words.rec.ravel(), rounding_bits(SEED, 0, 0, 7, elems))
    conv = quant8.conv_rounding_bits(SEED, 0, 7, (fast.channels, study.KERNEL))
    assert np.array_equal(words.conv, conv[:, -1])


def test_quick_run(tmp_path):
    assert (
        study.main(
            [
                "--quick",
                "--steps",
                "24",
                "--seeds",
                "2",
                "--every",
                "6",
                "--out-dir",
                str(tmp_path),
                "--plot-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    (out,) = tmp_path.glob("quant8-study-*.json")
    (plot,) = tmp_path.glob("quant8-study-*.svg")
    result = json.loads(out.read_text())
    assert plot.read_text().startswith("<svg") and plot.read_text().count("<polyline") == 2 * len(study.RUNS)
    for model in result["models"].values():
        runs = model["runs"]
        assert set(runs) == set(study.RUNS) and set(model["speculative"]) == set(study.MIXED)
        error = {name: run["state_error_mean"] for name, run in runs.items()}
        # float32 is the floor; each narrower store costs more than the 16-bit one
        assert error["float32"] < error["float16 nearest"] < error["bfloat16 nearest"] < error["int8 nearest"]
        assert error["bfloat16 nearest"] < error["e4m3 nearest"] < error["e5m2 nearest"]
        # error feedback changes what int8 stores
        assert error["int8 nearest + error feedback"] != error["int8 nearest"]
        assert runs["float32"]["first_divergence_vs_float32"] == [None, None]
        for run in runs.values():
            pct = list(run["logit_error_percentiles"].values())
            assert pct == sorted(pct) and len(run["state_error_median"]) == 4
