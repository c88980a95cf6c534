"""The "Integrate with your engine" pages' code runs: every snippet they show comes from these files.

- ``examples/integrate_engine_numpy.py`` (NumPy, runs everywhere) and ``examples/integrate_engine.py``
  (PyTorch on the NumPy reference's pools; on a GPU also on the Numba backend's): speculative
  decoding with a hand-written verify pass and the cache's commit leaves exactly the states plain
  decoding of the accepted tokens leaves. On the CPU both commit modes are bit-identical (the replay
  commit repeats the verify pass's float32 operations); on a GPU the scatter is bit-identical and
  the replay agrees within float32 rounding (its kernel fuses a multiply-add, torch's eager ops do not).
- ``examples/integrate_prefill.py``: chunked prefill stopping at block boundaries, checkpoints and
  tracking during speculative decoding; every checkpoint restores bit for bit.
- ``examples/integrate_chunked_prefill.py``: one chunked prefill per request that checkpoints every
  block boundary it passes into reserved entries; every checkpoint within the chunked-prefill
  tolerance table of the per-token decode of its prefix.
- ``examples/integrate_cuda_graph.py``: a verify + commit step captured in a CUDA graph replays
  bit-identically to the eager step (GPU only).
"""

import pathlib
import sys

import numpy as np
import pytest
from helpers import ON_GPU

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

MODES = ["scatter", "replay"]
#: float32 and float16 pools: the verify pass and the plain decode store after every step alike.
DTYPES = ["float32", "float16"]


def assert_same_bits(spec, plain):
    assert len(spec) == len(plain) == 4  # 2 layers x (recurrent, conv)
    for got, want in zip(spec, plain, strict=True):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert np.abs(spec[0].astype(np.float64)).max() > 0.1  # the states really moved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_numpy_loop_commit_equals_plain_decoding(mode, dtype):
    import integrate_engine_numpy as engine

    assert_same_bits(*engine.check(mode, dtype))


@pytest.mark.parametrize("mode", MODES)
def test_numpy_loop_detects_a_wrong_commit(mode):
    """Control: committing one token fewer than accepted leaves other states (the check can fail)."""
    import integrate_engine_numpy as engine

    real_commit = engine.commit
    try:
        engine.commit = lambda cache, accept, slots, **kw: real_commit(cache, accept - 1, slots, **kw)
        spec, plain = engine.check(mode)
    finally:
        engine.commit = real_commit
    assert any(a.tobytes() != b.tobytes() for a, b in zip(spec, plain, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_torch_loop_on_numpy_pools_commit_equals_plain_decoding(mode, dtype):
    pytest.importorskip("torch", reason="the PyTorch loop needs torch (the NumPy twin runs without it)")
    import integrate_engine as engine

    assert_same_bits(*engine.check("cpu", mode, dtype))


@pytest.mark.parametrize("mode", MODES)
def test_prefill_checkpoints_and_tracking_restore_exactly(mode):
    import integrate_prefill

    result = integrate_prefill.demo(mode)
    assert result["restored"] == [0, 16]  # the second request skips the shared 16 tokens' blocks
    checkpoints = result["checkpoints"]
    assert all(same for _, _, same in checkpoints), checkpoints
    found = {(row, length) for row, length, _ in checkpoints}
    assert {(0, 8), (0, 16), (0, 24), (1, 24)} <= found  # inserted during prefill
    assert (0, 32) in found and (1, 32) in found  # tracked during speculative decoding


def test_one_chunked_prefill_checkpoints_every_boundary():
    import integrate_chunked_prefill

    from mamba_cache.models.chunked import CHUNKED_TOLERANCE

    result = integrate_chunked_prefill.demo()
    assert result["restored"] == [0, 16]  # the second request skips the shared 16 tokens
    assert [(request, length) for request, length, _, _ in result["checkpoints"]] == [
        (r, n) for r in (0, 1) for n in (8, 16, 24)
    ]
    for request, length, recurrent, conv in result["checkpoints"]:
        assert recurrent <= CHUNKED_TOLERANCE["float32"]["recurrent"], (request, length, recurrent)
        assert conv <= CHUNKED_TOLERANCE["float32"]["conv"], (request, length, conv)


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="the GPU loop needs torch")
    if not ON_GPU or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (runs on the GPU machine)")
    return torch


@pytest.mark.parametrize("mode", MODES)
def test_gpu_torch_loop_on_numba_pools(mode):
    _torch_cuda()
    import integrate_engine as engine

    spec, plain = engine.check("cuda", mode)
    if mode == "scatter":
        assert_same_bits(spec, plain)
    else:  # the replay kernel's fma(u, B, h * dA) against torch's two rounded products
        for layer in range(2):
            np.testing.assert_allclose(spec[2 * layer], plain[2 * layer], rtol=1e-5, atol=1e-5)
            assert spec[2 * layer + 1].tobytes() == plain[2 * layer + 1].tobytes()  # conv: moved, never rounded


def test_gpu_script_runs():
    _torch_cuda()
    import integrate_engine as engine

    assert engine.main(["--device", "cuda"]) == 0


@pytest.mark.parametrize("mode", MODES)
def test_gpu_verify_and_commit_replay_from_a_cuda_graph(mode):
    _torch_cuda()
    import integrate_cuda_graph

    assert integrate_cuda_graph.run(mode) == [True] * 4


def test_tensor_parallel_ranks_commit_alike():
    import integrate_tp

    result = integrate_tp.demo(tp=2)
    assert result["heads"] == [2, 2] and result["n_groups"] == 1
    assert result["ranks"] == [0, 1]  # each rank's config records its rank (export / import read it)
    assert result["conv_dim"] == 2 * 2 + 2 * 1 * 4  # each rank: its x channels, its group's B and C
    assert result["committed"] == [1.0, 2.0] and result["padding"] == [0.0, 0.0]


def test_every_snippet_the_pages_include_is_a_section_of_a_file_run_here():
    """The docs show only code from the files above (pymdownx.snippets ``--8<-- "path:section"``)."""
    import re

    root = EXAMPLES.parent
    run_here = {
        "examples/integrate_engine.py",
        "examples/integrate_engine_numpy.py",
        "examples/integrate_prefill.py",
        "examples/integrate_chunked_prefill.py",
        "examples/integrate_tp.py",
        "examples/integrate_cuda_graph.py",
    }
    includes = []
    for page in sorted((root / "docs" / "integrate").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        includes += re.findall(r'^--8<-- "([^":]+):([a-z-]+)"$', text, re.M)
        fences = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
        assert all(block.startswith("--8<-- ") for block in fences), f"{page.name}: inline code not from a tested file"
    assert len(includes) >= 12
    for path, section in includes:
        assert path in run_here, path
        source = (root / path).read_text(encoding="utf-8")
        assert f"# --8<-- [start:{section}]" in source and f"# --8<-- [end:{section}]" in source, (path, section)
