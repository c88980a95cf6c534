"""Model presets with published recurrent-layer dimensions, for memory planning.

Each preset describes one model's recurrent layers (only the Mamba / linear-attention layers of a
hybrid: attention layers keep a KV cache instead, which this library does not manage). The conv
state of a Mamba2 layer covers the channels of x (``H * D``) and of B and C
(``2 * n_groups * N``); Gated DeltaNet's covers q, k (``2 * key_heads * key_dim``) and v. Under
tensor parallelism the heads split across ranks, and so do the group channels when ``n_groups``
divides by the TP size; otherwise every rank keeps all of them (as vLLM does for Mamba2).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ._config import Config, ConfigError

__all__ = ["CAPACITY_DTYPES", "ModelPreset", "PRESETS", "SIZE_FORMS", "capacity_table", "parse_bytes"]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """The recurrent-layer dimensions of one published model.

    Attributes:
        name: the preset's key in ``PRESETS``.
        description: the model, and which of its layers are recurrent.
        num_recurrent_layers: L.
        num_heads: H, heads of the recurrent state (value heads for Gated DeltaNet).
        head_dim: D.
        state_size: N.
        conv_dim: conv channels on one GPU.
        n_groups: groups of the group channels (Mamba2 B/C groups; GDN key heads).
        group_channels: the conv channels that belong to the groups (``2 * n_groups * N`` for Mamba2).
        conv_kernel: K.
        recurrent_state_dtype: dtype of the recurrent state.
        conv_state_dtype: dtype of the conv state.
        mixer: ``"mamba2"`` or ``"gdn"`` (Gated DeltaNet): the recurrence a replay commit recomputes.
        shipped_dtypes: the dtypes the model's serving stack keeps its states in, ``(recurrent,
            conv)``, as the model's config.json or the peer engines' defaults state them (a dtype
            name, or ``"model dtype"`` where an engine follows the weights' dtype).
        dtype_source: where ``shipped_dtypes`` comes from (config field or engine default, with the
            file), and what the sources do not state.
    """

    name: str
    description: str
    num_recurrent_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    conv_dim: int
    n_groups: int
    group_channels: int
    conv_kernel: int = 4
    recurrent_state_dtype: str = "float16"
    conv_state_dtype: str = "float16"
    mixer: str = "mamba2"
    shipped_dtypes: tuple[str, str] = ("model dtype", "model dtype")
    dtype_source: str = ""

    def config(self, batch: int, mtp: int = 0, tp: int = 1, commit_mode: str = "scatter") -> Config:
        """The cache config of one tensor-parallel rank for ``batch`` slots and MTP verify length ``mtp``.

        ``mixer`` and ``n_groups`` come from the preset (a rank whose ``tp`` does not divide the
        groups keeps them all; its config then says ``n_groups=1``, as the uniform head-to-group map
        of a replay commit cannot express that split). In checkpoint mode the history ring holds
        ``mtp`` steps (``history_len = max_intermediate_seq_len``: a fold at every commit).

        Raises:
            ConfigError: a bad batch, mtp or tp (tp must divide the heads).
        """
        config = Config(
            num_recurrent_layers=self.num_recurrent_layers,
            max_batch_size=batch,
            recurrent_state_num_heads=self.num_heads,
            recurrent_state_head_dim=self.head_dim,
            recurrent_state_size=self.state_size,
            conv_dim=self.conv_dim,
            conv_kernel=self.conv_kernel,
            max_intermediate_seq_len=mtp,
            recurrent_state_dtype=self.recurrent_state_dtype,
            conv_state_dtype=self.conv_state_dtype,
            commit_mode=commit_mode,
            history_len=mtp if commit_mode == "checkpoint" else 0,
            mixer=self.mixer,
            n_groups=self.n_groups if not (isinstance(tp, int) and tp > 1 and self.n_groups % tp) else 1,
        )
        if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1:
            replicated = 0 if self.n_groups % tp == 0 else self.group_channels
            return config.shard(tp, replicated_conv_channels=replicated)
        if tp != 1:
            raise ConfigError(f"tp must be an integer >= 1, got {tp!r}")
        return config


_VLLM_AUTO = (
    "vLLM: mamba_cache_dtype and mamba_ssm_cache_dtype default to 'auto', the model dtype, for both states "
    "(vllm/model_executor/layers/mamba/mamba_utils.py, MambaStateDtypeCalculator._mamba_state_dtype)"
)
_SGLANG_SSM = "SGLang: --mamba-ssm-dtype defaults to float32 (python/sglang/srt/server_args.py, mamba_ssm_dtype)"
_NOT_STATED = "not stated in the model's config.json (no state-dtype field)"
_UNSTATED_SOURCE = f"{_NOT_STATED}; {_VLLM_AUTO}; {_SGLANG_SSM}"
_AUTO_OR_FP32 = "model dtype (vLLM) / float32 (SGLang)"


def _mamba2(name, description, layers, heads, head_dim, state, groups, **kw) -> ModelPreset:
    return ModelPreset(
        name,
        description,
        layers,
        heads,
        head_dim,
        state,
        conv_dim=heads * head_dim + 2 * groups * state,
        n_groups=groups,
        group_channels=2 * groups * state,
        **kw,
    )


#: The presets, by name.
PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        _mamba2(
            "mamba2-130m",
            "Mamba2-130M: 24 Mamba2 layers, d_inner 1536 = 24 heads x 64, d_state 128",
            24,
            24,
            64,
            128,
            1,
            shipped_dtypes=(_AUTO_OR_FP32, "model dtype"),
            dtype_source=_UNSTATED_SOURCE,
        ),
        _mamba2(
            "mamba2-2.7b",
            "Mamba2-2.7B: 64 Mamba2 layers, d_inner 5120 = 80 heads x 64, d_state 128",
            64,
            80,
            64,
            128,
            1,
            shipped_dtypes=(_AUTO_OR_FP32, "model dtype"),
            dtype_source=_UNSTATED_SOURCE,
        ),
        # Nemotron-H-8B config.json: mamba_num_heads 128, mamba_head_dim 64, ssm_state_size 128, n_groups 8
        _mamba2(
            "nemotron-h-8b",
            "Nemotron-H-8B: 24 Mamba2 layers of 52, 128 heads x 64, d_state 128, 8 groups",
            24,
            128,
            64,
            128,
            8,
            shipped_dtypes=("float32", "model dtype"),
            dtype_source=(
                "vLLM reads mamba_ssm_cache_dtype from the model's config.json and uses float32 where it is absent "
                "(vllm/model_executor/models/config.py, NemotronHForCausalLMConfig.DEFAULT_MAMBA_SSM_CACHE_DTYPE; "
                "earlier releases fell back to float16); "
                "the conv state follows the model dtype (mamba_cache_dtype 'auto')"
            ),
        ),
        _mamba2(
            "falcon-h1-7b",
            "Falcon-H1-7B: 44 layers, each with a Mamba2 mixer of 24 heads x 128, d_state 256",
            44,
            24,
            128,
            256,
            1,
            shipped_dtypes=(_AUTO_OR_FP32, "model dtype"),
            dtype_source=_UNSTATED_SOURCE,
        ),
        # Qwen3-Next-80B-A3B config.json: linear_num_value_heads 32, linear_num_key_heads 16 (= n_groups),
        # linear_key_head_dim 128, linear_value_head_dim 128, linear_conv_kernel_dim 4
        ModelPreset(
            "qwen3-next-80b-a3b",
            "Qwen3-Next-80B-A3B-style Gated DeltaNet: 36 linear-attention layers of 48, 32 value heads, "
            "state [key dim 128, value dim 128] per head (float32), conv over q, k (16 key heads x 128) and v",
            num_recurrent_layers=36,
            num_heads=32,
            head_dim=128,
            state_size=128,
            conv_dim=2 * 16 * 128 + 32 * 128,
            n_groups=16,
            group_channels=2 * 16 * 128,
            recurrent_state_dtype="float32",
            mixer="gdn",
            shipped_dtypes=(_AUTO_OR_FP32, "model dtype"),
            dtype_source=_UNSTATED_SOURCE,
        ),
    )
}

#: The units of a size, lower-cased, to bytes: decimal (powers of 1000) and binary (powers of 1024).
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "eb": 10**18,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
    "eib": 2**60,
}

#: The size grammar in words, for messages and help texts.
SIZE_FORMS = (
    "a number and a unit, e.g. 20GiB, 1.5 GB or 512mib: B, KB, MB, GB, TB, PB, EB (powers of 1000) or "
    "KiB, MiB, GiB, TiB, PiB, EiB (powers of 1024), any case, a space allowed"
)


def parse_bytes(text: str, name: str = "size") -> int:
    """A size with its unit in bytes: ``"20GiB"`` -> 21474836480, ``"1.5 GB"`` -> 1500000000.

    The one grammar of every size the CLI takes: a non-negative number (``12``, ``1.5``, ``1e3``)
    followed by a unit, B, KB, MB, GB, TB, PB, EB (powers of 1000) or KiB, MiB, GiB, TiB, PiB, EiB
    (powers of 1024), in any case, with an optional space between. A bare number is refused: it
    could mean bytes or gigabytes.

    Args:
        text: the size as written.
        name: what the size is, for the error message (e.g. ``"--budget"``).

    Raises:
        ValueError: not of that form, negative, or more than 2**64 bytes; the message names
            ``name`` and the accepted forms.
    """
    text = str(text)
    number = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
    match = re.fullmatch(rf"\s*({number})\s*([a-zA-Z]*)\s*", text)
    if match and not match.group(2):
        raise ValueError(f"{name} {text.strip()!r} has no unit (bytes? gigabytes?): write {SIZE_FORMS}")
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be {SIZE_FORMS}; got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {text!r}")
    if not value <= 2**64:
        raise ValueError(f"{name} must be at most 16 EiB (2**64 bytes, the 64-bit address space), got {text!r}")
    return int(value)


#: The state dtypes a capacity table compares, in its row order (both kinds in the dtype; the per-step
#: buffers follow it), then the error-feedback row.
CAPACITY_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8")
#: The error-feedback row: int8 states with bfloat16 residuals (and bfloat16 per-step recurrent states
#: in scatter mode, as error feedback needs a wider per-step state).
FEEDBACK_ROW = "int8 + error feedback"


def capacity_config(preset: ModelPreset, row: str, mode: str, mtp: int = 0, tp: int = 1) -> Config:
    """One batch-1 config of a capacity table: ``row`` a ``CAPACITY_DTYPES`` name or ``FEEDBACK_ROW``.

    Raises:
        ConfigError: the combination is refused (the message says why).
    """
    base = preset.config(1, mtp, tp, commit_mode=mode)
    dtype = "int8" if row == FEEDBACK_ROW else row
    fields = {"recurrent_state_dtype": dtype, "conv_state_dtype": dtype}
    fields |= {"intermediate_recurrent_state_dtype": None, "intermediate_conv_state_dtype": None}
    if row == FEEDBACK_ROW:
        fields["error_feedback"] = True
        if base.has_intermediate_states:
            fields["intermediate_recurrent_state_dtype"] = "bfloat16"
    return dataclasses.replace(base, **fields)


def capacity_table(preset: ModelPreset, budget: int, mtp: int = 0, tp: int = 1) -> dict[str, dict[str, Any]]:
    """The largest batch within ``budget`` bytes per rank, by state dtype and commit mode (scales included).

    Args:
        preset: the model.
        budget: bytes per rank for the cache.
        mtp: the MTP verify length (0: plain decoding, one column ``"decode"``).
        tp: tensor-parallel ranks.

    Returns:
        ``{row: {mode: batch}}`` for every ``CAPACITY_DTYPES`` row and ``FEEDBACK_ROW``; the modes
        are ``scatter``, ``replay``, ``checkpoint`` (or ``decode`` without MTP). A batch is an int
        (0 when not one sequence fits), or a ``ConfigError`` where the combination is refused. The
        error-feedback row's batch counts its residuals (they are allocated); the other rows have
        none, so every other row is its capacity without them.
    """
    modes = ("scatter", "replay", "checkpoint") if mtp > 0 else ("decode",)
    table: dict[str, dict[str, Any]] = {}
    for row in (*CAPACITY_DTYPES, FEEDBACK_ROW):
        table[row] = {}
        for mode in modes:
            try:
                config = capacity_config(preset, row, "scatter" if mode == "decode" else mode, mtp, tp)
                table[row][mode] = budget // config.slot_bytes
            except ConfigError as error:
                table[row][mode] = error
    return table
