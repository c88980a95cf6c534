"""Both backends against the committed golden vectors in reference/, and the generator against them."""

import hashlib
import json

import numpy as np
import pytest
from helpers import BACKENDS, REFERENCE, golden_generator, to_host, write_pool

from mamba_cache import Config

MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=[c["name"] for c in MANIFEST["cases"]])
def test_backend_matches_golden_vectors(backend, case):
    generator = golden_generator()
    config = Config(**case["config"])
    expected = np.load(REFERENCE / case["file"])
    manager = BACKENDS[backend](config)
    pools = case.get("pools", MANIFEST["pools"])  # replay / checkpoint cases: main pools, stash or ring, counters
    for pool in pools:
        if pool.startswith(("stash_", "history_", "checkpoint_")):
            target = generator.pool_array(manager, pool)
            values = expected[f"initial_{pool}"]
            if isinstance(target, np.ndarray):
                target[...] = values
            else:
                target.copy_to_device(values)
        else:
            write_pool(manager, pool, expected[f"initial_{pool}"])
    as_array = np.asarray
    if backend == "numba":
        from numba import cuda

        as_array = cuda.to_device
    captured = {}
    for i, step in enumerate(case["steps"]):
        result = generator.apply(manager, step["op"], step["args"], captured, as_array=as_array)
        if result is not None:
            captured[f"step{i}"] = result
            for layer, array in enumerate(result):
                assert to_host(array).tobytes() == expected[f"step{i}_captured_{layer}"].tobytes(), (case["name"], i)
        for pool in pools:
            got = to_host(generator.pool_array(manager, pool))
            assert got.tobytes() == expected[f"step{i}_{pool}"].tobytes(), (
                f"{case['name']} step {i} ({step['op']}): {pool}"
            )
        for pool, values in generator.store_pools(captured).items():  # a prefix store's entries
            assert to_host(values).tobytes() == expected[f"step{i}_{pool}"].tobytes(), (
                f"{case['name']} step {i} ({step['op']}): {pool}"
            )


def test_generator_reproduces_the_committed_files(tmp_path):
    manifest = golden_generator().build(tmp_path)
    assert manifest == MANIFEST
    for case in MANIFEST["cases"]:
        committed, fresh = np.load(REFERENCE / case["file"]), np.load(tmp_path / case["file"])
        assert sorted(committed.files) == sorted(fresh.files)
        for name in committed.files:
            assert committed[name].tobytes() == fresh[name].tobytes(), name


def test_the_cases_cover_every_operation():
    ops = {step["op"] for case in MANIFEST["cases"] for step in case["steps"]}
    assert ops == {
        "reshape_intermediate_states",
        "scatter_mtp_states",
        "scatter_accepted_tree_states",
        "capture_recurrent_states",
        "capture_conv_states",
        "clear_states",
        "clear_slot",
        "restore_slot",
        "replay_mtp_states",
        "checkpoint_mtp_states",
        "materialize",
        "copy_slots",
        "prefix_store",
        "prefix_insert",
        "prefix_match_restore",
        "prefix_reserve",
    }


def test_replay_cases_cover_both_mixers():
    mixers = {case["config"]["mixer"] for case in MANIFEST["cases"] if case["config"]["commit_mode"] == "replay"}
    assert mixers == {"mamba2", "gdn"}


@pytest.mark.parametrize(
    "case",
    [c for c in MANIFEST["cases"] if c["config"]["commit_mode"] in ("replay", "checkpoint")],
    ids=lambda c: c["name"],
)
def test_replay_cases_are_exact_in_float32(monkeypatch, case):
    """Replaying them in float64 gives the same values: no step rounds, so FMA or not cannot matter."""
    import mamba_cache.replay.reference as reference
    from mamba_cache import NumpyMambaCacheManager

    generator = golden_generator()
    expected = np.load(REFERENCE / case["file"])
    monkeypatch.setattr(reference, "F32", np.float64)
    wide = Config(**{**case["config"], "recurrent_state_dtype": "float64", "intermediate_recurrent_state_dtype": None})
    manager = NumpyMambaCacheManager(wide)
    for pool in case["pools"]:
        generator.pool_array(manager, pool)[...] = expected[f"initial_{pool}"]
    for i, step in enumerate(case["steps"]):
        generator.apply(manager, step["op"], step["args"], {})
        np.testing.assert_array_equal(manager.pools.recurrent, expected[f"step{i}_recurrent"].astype(np.float64))
    assert (expected["initial_recurrent"] != expected[f"step{len(case['steps']) - 1}_recurrent"]).any()


def test_prefix_key_chain_matches_golden():
    from mamba_cache.prefix import block_digests, root_digest

    case = json.loads((REFERENCE / "prefix-keys.json").read_text())
    assert root_digest(case["namespace"]).hex() == case["root"]
    got = block_digests(case["tokens"], case["block_size"], case["namespace"])
    assert [d.hex() for d in got] == case["digests"] and len(got) == len(case["tokens"]) // case["block_size"]
    assert golden_generator().key_vectors() == case


def test_prefix_tail_keys_match_golden():
    """Off-grid keys: blake2b(d_q || tail as int32 little-endian, digest_size=16, person=b"tail")."""
    case = json.loads((REFERENCE / "prefix-keys.json").read_text())
    tokens, bs = case["tokens"], case["block_size"]
    chain = [bytes.fromhex(case["root"]), *(bytes.fromhex(d) for d in case["digests"])]
    off_grid = [n for n in range(1, len(tokens) + 1) if n % bs]
    assert sorted(map(int, case["tails"])) == off_grid and len(off_grid) > bs  # tails under d_0, d_1 and d_2
    for n in off_grid:
        q = n // bs
        tail = b"".join(t.to_bytes(4, "little", signed=True) for t in tokens[q * bs : n])
        want = hashlib.blake2b(chain[q] + tail, digest_size=16, person=b"tail").hexdigest()
        assert case["tails"][str(n)] == want, n
