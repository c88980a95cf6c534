"""The state-traffic model (mamba_cache.traffic): closed forms, the R = S rule, and the fold count of a real run."""

import numpy as np
import pytest
from helpers import SEED, replay_config

from mamba_cache import NumpyMambaCacheManager
from mamba_cache.presets import PRESETS
from mamba_cache.traffic import best_history_len, state_traffic


def sizes(config):
    """(state bytes, stash step bytes) of one slot, all layers, from the pool table."""
    pools = config.in_commit_mode("replay").pool_bytes()
    slots, seq = config.max_batch_size, config.max_intermediate_seq_len
    return (pools["recurrent"] + pools["conv"]) // slots, pools["replay_stash"] // (slots * seq)


@pytest.fixture
def accepts():
    return np.random.default_rng(SEED).integers(1, 5, 200)


def test_closed_forms(accepts):
    config = PRESETS["nemotron-h-8b"].config(batch=8, mtp=4)
    state, step = sizes(config)
    tokens = int(accepts.sum())
    plain = state_traffic(config.in_commit_mode("scatter"), "scatter", [1] * 50, verify=1)
    assert plain.bytes_per_token == 2 * state and plain.slot_bytes == state
    replay = state_traffic(config, "replay", accepts)
    assert replay.bytes_read == len(accepts) * 2 * state + tokens * step
    assert replay.bytes_written == len(accepts) * (state + 4 * step)
    scatter = state_traffic(config, "scatter", accepts)
    per_step = (config.pool_bytes()["intermediate_recurrent"] + config.pool_bytes()["intermediate_conv"]) // (8 * 4)
    assert scatter.bytes_written == len(accepts) * (4 * per_step + state)


def test_a_ring_of_one_window_folds_every_commit_and_costs_what_replay_costs(accepts):
    config = PRESETS["qwen3-next-80b-a3b"].config(batch=8, mtp=4)
    ring = state_traffic(config, "checkpoint", accepts, history_len=4)
    replay = state_traffic(config, "replay", accepts)
    assert ring.folds == len(accepts)
    assert (ring.bytes_read, ring.bytes_written) == (replay.bytes_read, replay.bytes_written)


def test_a_longer_ring_reads_and_writes_fewer_states(accepts):
    config = PRESETS["nemotron-h-8b"].config(batch=8, mtp=4)
    best = best_history_len(config, accepts, candidates=range(4, 65))
    assert best.history_len > 4
    assert best.bytes_per_token < state_traffic(config, "checkpoint", accepts, history_len=4).bytes_per_token


@pytest.mark.parametrize("ring", [3, 5, 8])
def test_fold_count_equals_the_managers(ring):
    """The model's cursor rule is the manager's: count the commits that advance p0 in a real run."""
    rng = np.random.default_rng(SEED)
    config = replay_config("mamba2", "float32", max_intermediate_seq_len=3, commit_mode="checkpoint", history_len=ring)
    manager = NumpyMambaCacheManager(config)
    accepts = rng.integers(1, 4, 40)
    folds = 0
    for a in accepts:
        manager.reshape_intermediate_states(1, 3)
        before = manager.checkpoint_positions()[0]
        manager.checkpoint_mtp_states(np.array([a], dtype=np.int32))
        folds += int(manager.checkpoint_positions()[0] != before)
    assert state_traffic(config, "checkpoint", accepts).folds == folds > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="tree"), "strategy must be one of"),
        (dict(verify=5), r"verify must be in 1\.\.4"),
        (dict(strategy="checkpoint", history_len=3), "history_len must be >= max_intermediate_seq_len"),
        (dict(accept_lengths=[0]), r"accept lengths must be in 1\.\.4"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, match):
    config = PRESETS["nemotron-h-8b"].config(batch=8, mtp=4)
    args = dict(strategy="replay", accept_lengths=[1, 2]) | kwargs
    with pytest.raises(ValueError, match=match):
        state_traffic(config, args.pop("strategy"), args.pop("accept_lengths"), **args)


def test_the_committed_plot_is_the_models_current_output():
    """docs/img/strategies.svg is drawn from the model (benchmarks/plot_strategies.py): it must not drift."""
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks.plot_strategies import svg

    assert (root / "docs" / "img" / "strategies.svg").read_text() == svg(), "rerun benchmarks/plot_strategies.py"


def test_the_strategies_page_holds_the_models_current_table():
    """The "When each wins" table of docs/concepts/strategies.md is benchmarks/plot_strategies.py's table()."""
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks.plot_strategies import table

    page = (root / "docs" / "concepts" / "strategies.md").read_text()
    assert table() in page, "rerun python benchmarks/plot_strategies.py --table and paste it into the page"
