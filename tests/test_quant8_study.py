"""The 8-bit quality study (benchmarks/quant8_study.py): its store is the cache's, and a tiny run."""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from helpers import SEED  # noqa: E402

from benchmarks import quant8_study as study  # noqa: E402
from mamba_cache import NumpyMambaCacheManager  # noqa: E402
from mamba_cache.precision import quant8  # noqa: E402


def test_store_reads_as_the_managers_8bit_pool():
    """The per-token store on a float32 pool gives what the manager's 8-bit commit reads back as."""
    sizes = study.QUICK["mamba2"]
    rng = np.random.default_rng(SEED)
    rows, position = 3, 41
    for dtype, stochastic, feedback in (("int8", True, True), ("float8_e4m3fn", False, False)):
        pool = NumpyMambaCacheManager(study.config("mamba2", sizes, rows, dtype, "float32", 1, stochastic, feedback))
        pool.reshape_intermediate_states(rows, 1)
        plain = NumpyMambaCacheManager(study.config("mamba2", sizes, rows))
        for layer in range(study.LAYERS):
            rec = (rng.standard_normal(pool.get_intermediate_recurrent_state(layer).shape) * 3).astype(np.float32)
            conv = rng.standard_normal(pool.get_intermediate_conv_state(layer).shape).astype(np.float32)
            pool.get_intermediate_recurrent_state(layer)[...] = rec
            pool.get_intermediate_conv_state(layer)[...] = conv
            plain.get_recurrent_state(layer)[...] = rec[:, 0]
            plain.get_conv_state(layer)[:, :, -1] = conv[:, 0, :, -1]  # the old columns: zero, as the pool's
        pool.scatter_mtp_states(np.ones(rows, np.int32), positions=np.full(rows, position - 1, np.int32))
        residuals = [None] * study.LAYERS
        study.store(plain, np.arange(rows), (dtype, stochastic, feedback), residuals, position)
        for layer in range(study.LAYERS):
            rec = quant8.dequantise(pool.get_recurrent_state(layer), pool.get_recurrent_scales(layer)[..., None])
            scales = quant8.expand_conv_scales(pool.get_conv_scales(layer), pool.get_conv_state(layer).shape[1])
            conv = quant8.dequantise(pool.get_conv_state(layer), scales)
            np.testing.assert_array_equal(plain.get_recurrent_state(layer), rec, err_msg=dtype)
            np.testing.assert_array_equal(plain.get_conv_state(layer)[..., -1], conv[..., -1], err_msg=dtype)
            if feedback:
                np.testing.assert_array_equal(
                    residuals[layer].astype(np.float32), pool.get_recurrent_residual(layer).astype(np.float32)
                )


def test_quick_run(tmp_path):
    out, plot = tmp_path / "q.json", tmp_path / "q.svg"
    assert (
        study.main(["--quick", "--steps", "24", "--seeds", "2", "--every", "6", "--out", str(out), "--plot", str(plot)])
        == 0
    )
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
