"""benchmarks/strategies.py's parts that need no GPU: the cases, the cursor, and the traffic kernel's writes."""

import pathlib
import sys

import numpy as np
from helpers import SEED, replay_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import strategies  # noqa: E402
from mamba_cache.traffic import state_traffic  # noqa: E402


def test_every_preset_window_and_batch_has_the_four_strategies_and_a_longer_best_ring():
    cases = strategies.cases(4, [1, 8], np.random.default_rng(SEED))
    keys = {(c.preset, c.verify, c.batch) for c, _ in cases}
    assert len(keys) == 2 * 2 * 2 and len(cases) == 4 * len(keys)
    for case, accepts in cases:
        assert accepts.shape == (strategies.PASSES, case.batch) and 1 <= accepts.min() <= accepts.max() <= case.verify
        if case.strategy == "checkpoint":
            assert case.history_len >= case.verify and case.config.history_len == case.history_len
    rings = {
        (c.preset, c.verify): c.history_len for c, _ in cases if c.strategy == "checkpoint" and c.history_len > c.verify
    }
    assert len(rings) == 4  # a best R beyond S for every preset and window


def test_the_cursor_folds_where_the_traffic_model_does():
    rng = np.random.default_rng(SEED)
    config = strategies.preset_config("nemotron-h-8b", 2, 3, 4, "checkpoint", 9)
    case = strategies.Case("nemotron-h-8b", "checkpoint", 4, 3, 9, config)
    accepts = strategies.accept_run(rng, 4, 3)
    hs = strategies.cursor(case, accepts)
    for row in range(3):
        resets = sum(1 for i in range(1, len(hs)) if hs[i][row] < hs[i - 1][row] + accepts[i - 1, row])
        last = hs[-1][row] + accepts[-1, row]
        resets += int(last + 4 > 9)
        assert resets == state_traffic(config, "checkpoint", accepts[:, row], history_len=9).folds


def test_the_traffic_kernel_writes_exactly_each_rows_window():
    config = replay_config("mamba2", "float32", max_intermediate_seq_len=2, commit_mode="checkpoint", history_len=5)
    case = strategies.Case("tiny", "checkpoint", 2, config.max_batch_size, 5, config)
    hs = [np.arange(config.max_batch_size) % 4]
    verify = strategies.VerifyTraffic(case, hs, stream=0)
    verify.dst.copy_to_device(np.zeros(verify.dst.shape, np.uint32))
    verify.launch(0)
    got = verify.dst.copy_to_host()
    for row, h in enumerate(hs[0]):
        first, words = h * verify.step, 2 * verify.step
        written = got[:, row, first : first + words]
        assert (written == np.arange(words, dtype=np.uint32)).all(), f"row {row}"
        assert not got[:, row, :first].any() and not got[:, row, first + words :].any(), f"row {row} wrote outside"
