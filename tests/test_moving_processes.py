"""Disaggregated prefill / decode with real processes on CPU (gloo): examples/disaggregated_gloo.py.

One spawn of three processes, in one test item, carries every default case, so the processes start once: prefill at
TP=1 hands its slots to decode at TP=2 and back (TP=2 -> TP=1), for the tiny Mamba2 with four B/C
groups and the tiny Gated DeltaNet with four key heads; then the fault cases of
``moving_faults.py`` on the same processes. TP=2 -> TP=4 (six processes) is ``slow``.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the process proofs need torch (torch.distributed, gloo)")

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    """The example as an importable module (the spawned processes import it by name: sys.path carries over)."""
    if str(ROOT / "examples") not in sys.path:
        sys.path.insert(0, str(ROOT / "examples"))
    return importlib.import_module("disaggregated_gloo")


def test_handoffs_and_faults_on_three_gloo_processes(tmp_path):
    """One test item, so the processes start once even when xdist spreads the file over workers."""
    from moving_faults import TIMEOUT, faults

    example = load_example()
    outdir = str(tmp_path)
    plan = [([0], [1, 2], mixer) for mixer in ("mamba2", "gdn")] + [([1, 2], [0], mixer) for mixer in ("mamba2", "gdn")]
    example.run(plan, 3, outdir, seed=7, after=faults)
    for prefill_tp, decode_tp, mixer in [(1, 2, "mamba2"), (1, 2, "gdn"), (2, 1, "mamba2"), (2, 1, "gdn")]:
        example.check(outdir, prefill_tp, decode_tp, mixer, seed=7)  # tokens equal, imported states exact
    with open(os.path.join(outdir, "faults.json")) as f:
        results = json.load(f)
    assert "fails its checksum" in results["flipped byte"]
    assert "another model" in results["other model"]
    assert "namespace 'other', this import names 'ns'" in results["other namespace"]
    assert "conv state dtype float16, this cache keeps float32" in results["other dtype"]
    assert "receiving from rank 2 failed" in results["killed sender"]
    assert results["killed sender seconds"] < TIMEOUT + 2.0  # within its timeout (plus scheduling)
    assert results["untouched"]


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_handoff_tp2_to_tp4(tmp_path, mixer):
    example = load_example()
    example.run([([0, 1], [2, 3, 4, 5], mixer)], 6, str(tmp_path), seed=11)
    example.check(str(tmp_path), 2, 4, mixer, seed=11)
