"""Memory planner: preset byte counts against figures worked out by hand, sharding, the CLI."""

import re
import subprocess
import sys

import pytest

from mamba_cache import Config, ConfigError
from mamba_cache.cli import main
from mamba_cache.presets import PRESETS, parse_bytes


def test_mamba2_130m_by_hand():
    # 24 layers x 8 slots x (24 heads x 64 x 128 = 196,608) fp16 = 75,497,472 B;
    # conv: 1536 + 2 x 128 = 1792 channels x 4 x 2 B x 8 slots x 24 layers = 2,752,512 B.
    config = PRESETS["mamba2-130m"].config(batch=8)
    assert config.pool_bytes() == {
        "recurrent": 75_497_472,
        "conv": 2_752_512,
        "intermediate_recurrent": 0,
        "intermediate_conv": 0,
        "replay_stash": 0,
        "history": 0,
        "scales": 0,
        "error_feedback": 0,
    }
    assert config.total_bytes == 78_249_984


def test_nemotron_h_8b_mtp_tp2_by_hand():
    # per rank: 128 / 2 = 64 heads; 8 groups split too: (8192 + 2 x 8 x 128) / 2 = 5120 channels.
    # recurrent 24 x 8 x 64 x 64 x 128 x 2 = 201,326,592; conv 24 x 8 x 5120 x 4 x 2 = 7,864,320;
    # MTP x4: 805,306,368 + 31,457,280.  Sum 1,045,954,560 = 997.5 MiB.
    config = PRESETS["nemotron-h-8b"].config(batch=8, mtp=4, tp=2)
    assert (config.recurrent_state_num_heads, config.conv_dim) == (64, 5120)
    assert config.pool_bytes() == {
        "recurrent": 201_326_592,
        "conv": 7_864_320,
        "intermediate_recurrent": 805_306_368,
        "intermediate_conv": 31_457_280,
        "replay_stash": 0,
        "history": 0,
        "scales": 0,
        "error_feedback": 0,
    }
    assert config.total_bytes == 1_045_954_560
    assert config.max_batch_size_for(20 * 2**30) == 164  # 21,474,836,480 // 130,744,320


def test_mamba2_2p7b_tp2_replicates_the_single_group():
    # 1 group cannot split 2 ways: each rank keeps B and C (2 x 128) and half of x (5120 / 2).
    config = PRESETS["mamba2-2.7b"].config(batch=1, tp=2)
    assert (config.recurrent_state_num_heads, config.conv_dim) == (40, 2560 + 256)


def test_falcon_h1_and_qwen3_next():
    falcon = PRESETS["falcon-h1-7b"].config(batch=1)
    # 44 x 24 x 128 x 256 x 2 B = 69,206,016; conv (3072 + 512) x 4 x 2 x 44 = 1,261,568
    assert falcon.pool_bytes()["recurrent"] == 69_206_016 and falcon.pool_bytes()["conv"] == 1_261_568
    qwen = PRESETS["qwen3-next-80b-a3b"].config(batch=2, tp=4)
    # per rank 8 value heads x 128 x 128 fp32 x 36 layers x 2 slots = 37,748,736; conv 8192 / 4 = 2048 channels
    assert qwen.pool_bytes()["recurrent"] == 37_748_736 and qwen.conv_dim == 2048


def test_shard_checks_divisibility():
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=1,
        recurrent_state_num_heads=6,
        recurrent_state_head_dim=4,
        recurrent_state_size=4,
        conv_dim=30,
        conv_kernel=4,
    )
    assert config.shard(3).recurrent_state_num_heads == 2 and config.shard(3).conv_dim == 10
    with pytest.raises(ConfigError, match="tp_size 4 must divide recurrent_state_num_heads"):
        config.shard(4)
    with pytest.raises(ConfigError, match="tp_size 2 must divide the split conv channels"):
        Config(
            num_recurrent_layers=2,
            max_batch_size=1,
            recurrent_state_num_heads=6,
            recurrent_state_head_dim=4,
            recurrent_state_size=4,
            conv_dim=31,
            conv_kernel=4,
        ).shard(2)
    with pytest.raises(ConfigError, match="tp_size must be >= 1"):
        config.shard(0)


def test_max_batch_for_budget():
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=4,
        recurrent_state_num_heads=2,
        recurrent_state_head_dim=2,
        recurrent_state_size=2,
        conv_dim=2,
        conv_kernel=2,
    )  # slot: 2 layers x (8 + 4 elems) x 2 B = 48 B
    assert config.slot_bytes == 48
    assert config.max_batch_size_for(47) == 0 and config.max_batch_size_for(480) == 10
    with pytest.raises(ConfigError, match="budget_bytes must be >= 0"):
        config.max_batch_size_for(-1)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20GiB", 20 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512 MiB", 2**29),
        ("1000B", 1000),
        ("12gb", 12 * 10**9),
        ("12 kib", 12 * 1024),
        ("1e3KB", 10**6),
        (".5TiB", 2**39),
        ("2 TB", 2 * 10**12),
        ("0B", 0),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("twenty gigs", "budget must be a number and a unit, e.g. 20GiB"),
        ("12", "budget '12' has no unit (bytes? gigabytes?)"),
        ("1e12", "budget '1e12' has no unit"),
        ("12 XB", "budget must be a number and a unit"),
        ("-1GiB", "budget must be >= 0 bytes"),
        ("17EiB", "budget must be at most 16 EiB"),
    ],
)
def test_parse_bytes_refuses_nonsense_and_bare_numbers(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        parse_bytes(text, name="budget")
    if "must be >= 0" not in message and "at most" not in message:  # a form error lists the accepted forms
        assert "KiB" in str(error.value) and "KB" in str(error.value)


def test_cli_plan_prints_the_table(capsys):
    assert (
        main(["plan", "--preset", "nemotron-h-8b", "--batch", "8", "--mtp", "4", "--tp", "2", "--budget", "20GiB"]) == 0
    )
    out = capsys.readouterr().out
    assert "997.50 MiB" in out and "64 heads, 5120 conv channels" in out and "per rank: 164" in out


def test_cli_refuses_a_bad_tp(capsys):
    assert main(["plan", "--preset", "mamba2-130m", "--tp", "5"]) == 2
    assert "tp_size 5 must divide recurrent_state_num_heads (24)" in capsys.readouterr().err


def test_cli_help_lists_commands():
    result = subprocess.run(
        [sys.executable, "-m", "mamba_cache.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("plan", "presets", "demo"):
        assert command in result.stdout


def test_every_preset_states_its_shipped_state_dtypes_and_their_source(capsys):
    from mamba_cache import cli

    names = {"float16", "bfloat16", "float32", "float64"}
    for name, preset in PRESETS.items():
        recurrent, conv = preset.shipped_dtypes
        for dtype in (recurrent, conv):  # a dtype name, or the engines' rule, never empty
            assert dtype in names or "model dtype" in dtype, (name, dtype)
        assert "vLLM" in preset.dtype_source and ".py" in preset.dtype_source, name  # cites the engine's file
        assert cli.main(["plan", "--preset", name, "--batch", "1"]) == 0
        out = " ".join(capsys.readouterr().out.split())  # unwrapped
        assert f"shipped state dtypes, not this plan's: recurrent {recurrent}, conv {conv}" in out
        assert f"source: {preset.dtype_source}" in out
    assert PRESETS["nemotron-h-8b"].shipped_dtypes[0] == "float32"  # vLLM's NemotronH default
    assert cli.main(["presets"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for preset in PRESETS.values():
        recurrent, conv = preset.shipped_dtypes
        assert f"shipped state dtypes: recurrent {recurrent}, conv {conv} source: {preset.dtype_source}" in out


def test_presets_carry_mixer_and_groups_for_a_replay_plan():
    for name, preset in PRESETS.items():
        assert preset.mixer in ("mamba2", "gdn"), name
        assert preset.num_heads % preset.n_groups == 0, name
        if preset.mixer == "mamba2":  # the group channels are B and C
            assert preset.group_channels == 2 * preset.n_groups * preset.state_size, name
        config = preset.config(batch=2, mtp=3, commit_mode="replay")
        assert (config.mixer, config.n_groups, config.has_replay_stash) == (preset.mixer, preset.n_groups, True)
