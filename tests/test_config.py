"""Config: validation, dtype normalisation and byte accounting (figures worked out by hand)."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from mamba_cache import Config, ConfigError, format_bytes

DIMENSIONS = [
    "max_batch_size",
    "recurrent_state_num_heads",
    "recurrent_state_head_dim",
    "recurrent_state_size",
    "conv_dim",
    "conv_kernel",
]

VALID = dict(
    num_recurrent_layers=2,
    max_batch_size=4,
    recurrent_state_num_heads=3,
    recurrent_state_head_dim=5,
    recurrent_state_size=7,
    conv_dim=11,
    conv_kernel=4,
    max_intermediate_seq_len=3,
)


def test_defaults_match_cpp_and_are_a_no_op():
    config = Config()
    assert config.num_recurrent_layers == 0
    assert config.recurrent_state_dtype == "float16" and config.conv_state_dtype == "float16"
    assert not config.enabled and not config.has_intermediate_states
    assert config.total_bytes == 0


def test_field_order_is_the_documented_one():
    names = [f.name for f in dataclasses.fields(Config)]
    assert names == [
        "num_recurrent_layers",
        *DIMENSIONS,
        "max_intermediate_seq_len",
        "recurrent_state_dtype",
        "conv_state_dtype",
        "verify_writes_main_pool",
        "intermediate_recurrent_state_dtype",
        "intermediate_conv_state_dtype",
        "stochastic_rounding",
        "rounding_seed",
        "commit_mode",
        "mixer",
        "n_groups",
        "history_len",
        "error_feedback",
        "tp_size",
        "tp_rank",
        "replicated_groups",
    ]


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config(**VALID).max_batch_size = 8


@pytest.mark.parametrize("field", DIMENSIONS)
@pytest.mark.parametrize("value", [0, -1])
def test_each_dimension_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be >= 1, got {value}"):
        Config(**{**VALID, field: value})


@pytest.mark.parametrize("field", [*DIMENSIONS, "num_recurrent_layers", "max_intermediate_seq_len"])
@pytest.mark.parametrize("value", [2.0, "3", True, None])
def test_each_dimension_must_be_an_integer(field, value):
    with pytest.raises(ConfigError, match=rf"{field} must be an integer"):
        Config(**{**VALID, field: value})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_negative_layers_and_seq_len_refused():
    with pytest.raises(ConfigError, match="num_recurrent_layers must be >= 0, got -2"):
        Config(num_recurrent_layers=-2)
    with pytest.raises(ConfigError, match="max_intermediate_seq_len must be >= 0"):
        Config(**{**VALID, "max_intermediate_seq_len": -1})


def test_zero_layers_skips_validation_like_the_cpp():
    config = Config(num_recurrent_layers=0, max_batch_size=-5, conv_dim=0, recurrent_state_dtype="int8")
    assert config.total_bytes == 0


@pytest.mark.parametrize("field", ["recurrent_state_dtype", "conv_state_dtype"])
def test_dtypes_are_normalised_and_checked(field):
    assert Config(**VALID, **{field: np.float32}).__getattribute__(field) == np.dtype(np.float32)
    with pytest.raises(
        ConfigError,
        match=rf"{field} must be one of float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2, int8, "
        "got int32",
    ):
        Config(**VALID, **{field: "int32"})
    with pytest.raises(ConfigError, match=rf"{field} must be a NumPy dtype"):
        Config(**VALID, **{field: "no-such-type"})


def test_numpy_integers_accepted():
    config = Config(**{**VALID, "max_batch_size": np.int64(4)})
    assert config.max_batch_size == 4 and type(config.max_batch_size) is int


def test_shapes():
    config = Config(**VALID)
    assert config.recurrent_state_shape == (4, 3, 5, 7)
    assert config.conv_state_shape == (4, 11, 4)
    assert config.intermediate_recurrent_state_shape == (4, 3, 3, 5, 7)
    assert config.intermediate_conv_state_shape == (4, 3, 11, 4)


def test_byte_accounting_by_hand():
    # 2 layers x 4 slots x (3*5*7 = 105) fp16 = 1680; conv 2 x 4 x 44 x 2 = 704; times S = 3.
    config = Config(**VALID)
    assert config.pool_bytes() == {
        "recurrent": 1680,
        "conv": 704,
        "intermediate_recurrent": 5040,
        "intermediate_conv": 2112,
        "replay_stash": 0,
        "history": 0,
        "scales": 0,
        "error_feedback": 0,
    }
    assert config.total_bytes == 9536
    fp32 = Config(**{**VALID, "recurrent_state_dtype": "float32", "max_intermediate_seq_len": 0})
    assert fp32.pool_bytes() == {
        "recurrent": 3360,
        "conv": 704,
        "intermediate_recurrent": 0,
        "intermediate_conv": 0,
        "replay_stash": 0,
        "history": 0,
        "scales": 0,
        "error_feedback": 0,
    }


def test_mamba2_2p7b_like_bytes():
    # 64 layers, 80 heads x 64 x 128 fp16 = 1,310,720 bytes a slot; 8 slots -> 640 MiB.
    config = Config(
        num_recurrent_layers=64,
        max_batch_size=8,
        recurrent_state_num_heads=80,
        recurrent_state_head_dim=64,
        recurrent_state_size=128,
        conv_dim=5376,
        conv_kernel=4,
        max_intermediate_seq_len=4,
    )
    assert config.pool_bytes()["recurrent"] == 64 * 8 * 80 * 64 * 128 * 2 == 640 * 2**20
    assert config.pool_bytes()["conv"] == 64 * 8 * 5376 * 4 * 2
    assert config.pool_bytes()["intermediate_recurrent"] == 4 * 640 * 2**20


def test_memory_table_lists_pools_and_total():
    table = Config(**VALID).memory_table()
    assert "intermediate_conv" in table and "[4, 3, 11, 4]" in table and "9.31 KiB" in table
    assert "intermediate" not in Config(**{**VALID, "max_intermediate_seq_len": 0}).memory_table()


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (3 * 2**30, "3.00 GiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_import_needs_numpy_only():
    code = "import sys, mamba_cache; mamba_cache.Config(); assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
@pytest.mark.parametrize("tp, groups", [(1, 2), (2, 2), (2, 1), (4, 1)])
def test_shards_record_their_heads_and_conv_sections(mixer, tp, groups):
    """Every rank's sections tile each whole section once (split ones) or hold it whole (replicated groups)."""
    heads, dim, size = 4, 3, 5
    keys = groups * (dim if mixer == "gdn" else size)
    whole = heads * (size if mixer == "gdn" else dim)
    conv_dim = 2 * keys + whole
    dims = dict(recurrent_state_num_heads=heads, recurrent_state_head_dim=dim, recurrent_state_size=size)
    config = Config(**{**VALID, **dims, "conv_dim": conv_dim, "mixer": mixer, "n_groups": groups})
    names = ("x", "B", "C") if mixer == "mamba2" else ("q", "k", "v")
    covered = {name: [] for name in names}
    for rank in range(tp):
        shard = config.shard(tp, replicated_conv_channels=0 if groups % tp == 0 else 2 * keys, rank=rank)
        assert (shard.tp_size, shard.tp_rank) == (tp, rank)
        assert shard.unsharded_num_heads == heads and shard.unsharded_n_groups == groups
        assert shard.head_range == (rank * heads // tp, (rank + 1) * heads // tp)
        sections = shard.conv_sections
        assert [s.name for s in sections] == list(names)
        assert sum(s.channels for s in sections) == shard.conv_dim
        assert [s.offset for s in sections] == [0, sections[0].channels, sections[0].channels + sections[1].channels]
        for s in sections:
            assert s.total == {"heads": whole, "groups": keys}[s.split]
            covered[s.name] += range(s.start, s.start + s.channels)
    for name, channels in covered.items():
        split = "heads" if name in ("x", "v") else "groups"
        total = whole if split == "heads" else keys
        copies = tp if split == "groups" and groups % tp else 1  # replicated: every rank holds it whole
        assert sorted(channels) == sorted(list(range(total)) * copies), name


def test_shard_fields_are_checked():
    with pytest.raises(ConfigError, match=r"tp_rank must be in \[0, 2\)"):
        Config(**VALID, tp_size=2, tp_rank=2)
    with pytest.raises(ConfigError, match="tp_size must be >= 1"):
        Config(**VALID, tp_size=0)
    with pytest.raises(ConfigError, match="replicated_groups needs n_groups == 1"):
        Config(**{**VALID, "recurrent_state_num_heads": 4, "n_groups": 2}, replicated_groups=True)
    with pytest.raises(ConfigError, match="already rank 1 of 2"):
        Config(**{**VALID, "recurrent_state_num_heads": 4}).shard(2, 1, rank=1).shard(2)
    assert Config(**VALID).conv_sections is None  # 11 channels follow no mixer layout (H * D + 2 * G * N = 29)
