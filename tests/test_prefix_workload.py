"""The prefix-store workload simulation (benchmarks/prefix_workload.py) on a tiny workload."""

import json
import pathlib
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import prefix_workload as pw  # noqa: E402

TINY = dict(
    system_prompts=3,
    conversations=14,
    concurrency=4,
    block_size=16,
    window=4,
    system_tokens=(20, 70),
    turns=(2, 4),
    user_tokens=(3, 30),
    reply_tokens=(5, 40),
)


@pytest.fixture
def workload(rng):
    return pw.Workload(seed=int(rng.integers(2**31)), **TINY)


def test_workload_records_keep_their_invariants(workload):
    records = pw.simulate(workload, [2, 5, 12])
    assert {r["op"] for r in records} == {"prefix_workload"}
    assert [r["policy"] for r in records] == ["last"] * 4 + ["every"] * 4
    for policy in pw.POLICIES:
        rows = [r for r in records if r["policy"] == policy]
        bound = rows[-1]
        assert bound["unbounded"] and not any(r["unbounded"] for r in rows[:-1])
        assert bound["hit_token_ratio"] == 1.0 and bound["evictions"] == 0 and bound["hit_tokens"] > 0
        for r in rows:
            assert 0 <= r["hit_token_ratio"] <= 1.0
            assert r["prefill_tokens_saved"] == r["hit_tokens"]  # counted by the simulation and by the store
            assert r["hit_tokens"] <= r["prompt_tokens"] and r["hits"] <= r["lookups"]
            assert r["lookups"] == bound["lookups"]  # one match per turn, whatever the store size
            assert r["hit_tokens"] % workload.block_size == 0
        assert rows[0]["evictions"] > 0  # the smallest store is under pressure on this workload
        assert any(r["tracked_checkpoints"] > 0 for r in rows)  # tracking during decode published checkpoints


def test_workload_is_reproducible_from_its_seed(workload):
    assert pw.simulate(workload, [3]) == pw.simulate(workload, [3])


def test_every_restore_is_checked_against_the_matched_prefix(workload, monkeypatch):
    """A store that restores the wrong entry fails the run (the check in the simulation bites)."""
    streams, order = pw.build(workload)
    sim = pw.Simulator(workload, streams, 8, "every", workload.seed)
    real_restore = sim.store.restore

    def wrong_restore(handle, slot, stream=None):
        real_restore(handle, slot, stream)
        sim.main[0] ^= 1  # one flipped bit in the restored state

    monkeypatch.setattr(sim.store, "restore", wrong_restore)
    with pytest.raises(AssertionError, match="wrong state"):
        sim.run(order)


def test_main_prints_the_seed_and_writes_a_record(workload, tmp_path, capsys):
    argv = ["--seed", str(workload.seed), "--sizes", "2,4", "--out", str(tmp_path)]
    assert pw.main(argv, base=workload) == 0
    out = capsys.readouterr().out
    assert f"seed {workload.seed}" in out and "vs unbounded" in out
    (path,) = tmp_path.glob("prefix_workload-*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["workload"]["seed"] == workload.seed
    assert len(data["records"]) == 2 * 3 and {r["op"] for r in data["records"]} == {"prefix_workload"}


# ---------------------------------------------------------------- the trace families (issue #25)
from benchmarks import prefix_families as pf  # noqa: E402
from benchmarks import prefix_traces as pt  # noqa: E402

SHAPES = {
    "chat": {"conversations": 5, "system_tokens": (20, 90), "concurrency": 3},
    "agentic": {"sessions": 2, "shared_tokens": 300, "context_tokens": (50, 200), "turns": (2, 4), "concurrency": 2},
    "fewshot": {"requests": 8, "prefixes": 2, "prefix_tokens": (60, 700)},
}


def brute_oracle(trace):
    """Per request: the longest common prefix of its prompt with anything an earlier request consumed."""
    done, hits = [], []
    for r in trace.requests:
        prompt = trace.streams[r.stream][: r.prompt]
        best = 0
        for seq in done:
            common = min(seq.size, prompt.size - 1)
            differs = np.flatnonzero(seq[:common] != prompt[:common])
            best = max(best, int(differs[0]) if differs.size else common)
        hits.append(best)
        done.append(trace.streams[r.stream][: r.end - 1])
    return hits


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_oracle_is_the_longest_prefix_any_earlier_request_consumed(rng, family):
    trace = pt.build(family, int(rng.integers(2**31)), **SHAPES[family])
    oracle = pt.oracle_hits(trace)
    assert oracle.tolist() == brute_oracle(trace) and oracle.sum() > 0


def test_no_placement_or_policy_beats_the_oracle(rng):
    seed = int(rng.integers(2**31))
    records = pf.simulate(list(SHAPES), seed, sizes=(2, 4096), shapes=SHAPES)
    assert {r["op"] for r in records} == {"prefix_family"}
    for family in SHAPES:
        trace = pt.build(family, seed, **SHAPES[family])
        oracle = pt.oracle_hits(trace)
        for placement, policy in [("every_block", "lru"), ("branch_point+end_of_request", "flop_aware")]:
            hits = pf.run_store(trace, 64, 4096, placement, policy)  # every restore checked inside
            assert (hits <= oracle).all(), (family, placement, policy)
        rows = [r for r in records if r["family"] == family and r["entries"]]
        top = next(r for r in records if r["family"] == family and r["placement"] == "oracle")
        assert all(r["hit_tokens"] <= top["hit_tokens"] for r in rows)
        assert any(r["hit_tokens"] > 0 for r in rows)
        for r in rows:
            assert 0 <= r["token_hit_rate"] <= 1 and r["ttft_p50_ms"] <= r["ttft_p95_ms"]
    checks = pf.targets(records)
    assert {(c["family"], c["block_size"], c["where"]) for c in checks} == {
        (f, bs, w) for f in SHAPES for bs in pf.BLOCK_SIZES for w in ("best", "half")
    }
    assert any("target" in line for line in pf.verdicts(checks))
    ET.fromstring(pf.svg(records, list(SHAPES)))  # a well-formed SVG


def test_flop_and_ttft_models_add_up():
    assert pt.prefill_flops(0, 300) + pt.prefill_flops(300, 1000) == pytest.approx(pt.prefill_flops(0, 1000))
    assert pt.FLOPS_A == pytest.approx(14.2e9, rel=0.01)  # the stated per-token cost of the 8B-like hybrid
    times = pt.ttft(np.full(5, 4000), np.array([0, 1, 1000, 2000, 3999]))
    assert (np.diff(times[1:]) < 0).all() and times[0] < times[1]  # a hit pays one restore copy


def test_families_main_writes_new_files_and_times_match(rng, tmp_path, monkeypatch, capsys):
    seed = int(rng.integers(2**31))
    timing = pf.time_match(seed, length=2048, block_size=64, repeat=2)
    assert set(timing["ms"]) == {"grid only", "realistic", "every block"} and timing["ratio_realistic"] > 0
    real_simulate, real_time = pf.simulate, pf.time_match
    monkeypatch.setattr(pf, "simulate", lambda f, sd, sc: real_simulate(f, sd, sc, sizes=(2, 64), shapes=SHAPES))
    monkeypatch.setattr(pf, "time_match", lambda sd: real_time(sd, length=1024, block_size=64, repeat=1))
    argv = ["--families", "chat,fewshot", "--seed", str(seed), "--out", str(tmp_path)]
    assert pw.main(argv) == 0 and pw.main(argv) == 0
    out = capsys.readouterr().out
    assert f"seed {seed}" in out and "targets:" in out and "off-grid / grid-only" in out
    first, second = sorted(tmp_path.glob("prefix_families-*.json"))  # the second run did not overwrite
    assert json.loads(first.read_text())["records"] == json.loads(second.read_text())["records"]
    assert len(list(tmp_path.glob("prefix_families-*.svg"))) == 2
    match_only = ["--match-only", "--seed", str(seed), "--out", str(tmp_path)]
    assert pw.main(match_only) == 0 and pw.main(match_only) == 0
    assert "off-grid / grid-only" in capsys.readouterr().out
    runs = sorted(tmp_path.glob("prefix_match-*.json"))
    assert len(runs) == 2 and all(p.with_suffix(".txt").exists() for p in runs)  # a new file per run
    assert {json.loads(p.read_text())["meta"]["seed"] for p in runs} == {seed}
