"""The prefix-store workload simulation (benchmarks/prefix_workload.py) on a tiny workload."""

import json
import pathlib
import sys

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
