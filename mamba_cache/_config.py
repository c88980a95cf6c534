"""Cache configuration: the fields, their validation and the byte accounting.

Dimension letters used throughout the package:

    L  num_recurrent_layers       number of recurrent (Mamba / linear-attention) layers
    B  max_batch_size             slots per layer
    H  recurrent_state_num_heads  SSM heads
    D  recurrent_state_head_dim   channels per head
    N  recurrent_state_size       SSM state size per channel
    C  conv_dim                   conv1d channels
    K  conv_kernel                conv1d kernel width
    S  max_intermediate_seq_len   MTP verify length the intermediate buffers hold (0 = MTP off)
    R  history_len                checkpoint mode: steps of the history ring per slot (R >= S)
    V  (per call)                 the current verify length, 1 <= V <= S
    G  n_groups                   Mamba2's B/C groups, or Gated DeltaNet's key heads (H % G == 0)
    P  (prefix store)             entries of a prefix-state store

This module is backend-neutral and imports nothing but the standard library and NumPy.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import numpy as np

from .precision.reference import bfloat16

__all__ = ["Config", "ConfigError", "ConvSection", "format_bytes"]

#: The state dtypes both backends support. The kernels copy raw words, so any fixed-size
#: floating type works; these are the ones an engine stores recurrent state in. bfloat16 comes
#: from ml_dtypes (the Numba backend stores it as uint16 raw bits).
SUPPORTED_DTYPES = (np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64))

#: ``Config.commit_mode`` values: keep every per-step state and copy one, replay the accepted steps, or keep
#: a checkpoint and a history ring of steps past it (checkpointed decoding).
COMMIT_MODES = ("scatter", "replay", "checkpoint")
#: ``Config.mixer`` values: the recurrence a replay commit recomputes.
MIXERS = ("mamba2", "gdn")

_DIMENSION_FIELDS = (
    "max_batch_size",
    "recurrent_state_num_heads",
    "recurrent_state_head_dim",
    "recurrent_state_size",
    "conv_dim",
    "conv_kernel",
)


class ConfigError(ValueError):
    """A [`Config`][mamba_cache.Config] field holds a value the cache cannot be built from.

    The message names the field, the value given and the allowed range.
    """


def _as_int(name: str, value: Any) -> int:
    """Return ``value`` as a Python int, refusing bools, floats and strings."""
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}") from None


def _as_state_dtype(name: str, value: Any) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise ConfigError(
            f"{name} must be a NumPy dtype (float16, bfloat16, float32, float64), got {value!r}"
        ) from None
    if dtype not in SUPPORTED_DTYPES:
        allowed = "float16, bfloat16, float32, float64"
        raise ConfigError(f"{name} must be one of {allowed}, got {dtype.name}")
    return dtype


def format_bytes(n: int) -> str:
    """Format a byte count with a binary prefix, e.g. ``1536 -> '1.50 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Shape and dtype of every state buffer of a [`MambaCacheManagerBase`][mamba_cache.MambaCacheManagerBase].

    Mirrors the C++ ``MambaCacheManager::Config``. When ``num_recurrent_layers`` is 0 the manager
    is a no-op and the other fields are not validated (the C++ returns before validating them).
    Otherwise every dimension must be a positive integer and ``max_intermediate_seq_len`` a
    non-negative one (0 turns the MTP intermediate buffers off).

    Attributes:
        num_recurrent_layers: L, the number of recurrent layers; 0 makes the manager a no-op.
        max_batch_size: B, slots per layer.
        recurrent_state_num_heads: H.
        recurrent_state_head_dim: D.
        recurrent_state_size: N.
        conv_dim: C, conv1d channels.
        conv_kernel: K, conv1d kernel width.
        max_intermediate_seq_len: S, the MTP verify length; 0 disables the intermediate buffers.
        recurrent_state_dtype: dtype of the recurrent and intermediate recurrent states
            (``float16``, ``bfloat16`` (``"bfloat16"`` or ``ml_dtypes.bfloat16``), ``float32`` or
            ``float64``; normalised to a ``numpy.dtype``).
        conv_state_dtype: dtype of the conv and intermediate conv states (same choices).
        verify_writes_main_pool: True (the seed's behaviour) when the MTP verify pass also writes
            the state after all ``V`` tokens into the main pool, so a full accept needs no copy;
            False when it leaves the main pool untouched, so ``accept_lengths[b] == V`` commits
            step ``V - 1`` too. Normalised to False in replay and checkpoint mode (the verify pass
            never writes the main pools there).
        intermediate_recurrent_state_dtype: dtype of the per-step recurrent states; ``None`` (the
            default) means ``recurrent_state_dtype``. Commits convert in the same launch.
        intermediate_conv_state_dtype: likewise for the per-step conv states.
        stochastic_rounding: round stochastically (instead of to nearest even) wherever a float32
            value, or a wider state, is stored into a 16-bit state.
        rounding_seed: the seed of the stochastic-rounding bits (an int in ``[0, 2**64)``).
        commit_mode: ``"scatter"`` (keep every per-step state, copy the accepted one),
            ``"replay"`` (keep a small per-step stash, recompute the accepted state) or
            ``"checkpoint"`` (keep a checkpoint in the main pools and a ring of ``history_len``
            stashed steps past it; a commit only counts the accepted steps, and folds them into
            the checkpoint when the ring could not hold another verify window).
        mixer: ``"mamba2"`` or ``"gdn"`` (Gated DeltaNet): the recurrence a replay commit runs.
        n_groups: G, Mamba2's B/C groups or Gated DeltaNet's key heads; must divide H.
        history_len: R, the steps of the history ring per slot in checkpoint mode; there it must
            be ``>= max_intermediate_seq_len >= 1``; 0 (the default) in the other modes.
        tp_size: the tensor-parallel ranks the model is split over (1: unsharded). ``shard`` sets it;
            with ``tp_rank`` it places this cache's heads and conv channels in the whole model
            (``head_range``, ``conv_sections``), which moving a state between TP sizes needs.
        tp_rank: this rank, in ``[0, tp_size)``.
        replicated_groups: every rank keeps the model's one B/C group (Mamba2) or key head (Gated
            DeltaNet) whole instead of a share of the groups; needs ``n_groups == 1``.

    Raises:
        ConfigError: a field is invalid; the message names it, its value and the allowed range.
    """

    num_recurrent_layers: int = 0
    max_batch_size: int = 0
    recurrent_state_num_heads: int = 0
    recurrent_state_head_dim: int = 0
    recurrent_state_size: int = 0
    conv_dim: int = 0
    conv_kernel: int = 0
    max_intermediate_seq_len: int = 0
    recurrent_state_dtype: Any = "float16"
    conv_state_dtype: Any = "float16"
    verify_writes_main_pool: bool = True
    intermediate_recurrent_state_dtype: Any = None
    intermediate_conv_state_dtype: Any = None
    stochastic_rounding: bool = False
    rounding_seed: int = 0
    commit_mode: str = "scatter"
    mixer: str = "mamba2"
    n_groups: int = 1
    history_len: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    replicated_groups: bool = False

    def __post_init__(self) -> None:
        for name in ("verify_writes_main_pool", "stochastic_rounding", "replicated_groups"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{name} must be a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))
        for name, allowed in (("commit_mode", COMMIT_MODES), ("mixer", MIXERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.commit_mode in ("replay", "checkpoint"):
            object.__setattr__(self, "verify_writes_main_pool", False)
        history = _as_int("history_len", self.history_len)
        if history < 0 or (history and self.commit_mode != "checkpoint"):
            raise ConfigError(
                f"history_len must be 0 unless commit_mode='checkpoint' (and >= 0), got {history} "
                f"with commit_mode={self.commit_mode!r}"
            )
        object.__setattr__(self, "history_len", history)
        tp = _as_int("tp_size", self.tp_size)
        if tp < 1:
            raise ConfigError(f"tp_size must be >= 1, got {tp}")
        rank = _as_int("tp_rank", self.tp_rank)
        if not 0 <= rank < tp:
            raise ConfigError(f"tp_rank must be in [0, {tp}) (tp_size {tp}), got {rank}")
        object.__setattr__(self, "tp_size", tp)
        object.__setattr__(self, "tp_rank", rank)
        seed = _as_int("rounding_seed", self.rounding_seed)
        if not 0 <= seed < 2**64:
            raise ConfigError(f"rounding_seed must be in [0, 2**64), got {seed}")
        object.__setattr__(self, "rounding_seed", seed)
        layers = _as_int("num_recurrent_layers", self.num_recurrent_layers)
        if layers < 0:
            raise ConfigError(f"num_recurrent_layers must be >= 0, got {layers}")
        object.__setattr__(self, "num_recurrent_layers", layers)
        if layers == 0:
            return
        for name in _DIMENSION_FIELDS:
            value = _as_int(name, getattr(self, name))
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
            object.__setattr__(self, name, value)
        seq = _as_int("max_intermediate_seq_len", self.max_intermediate_seq_len)
        if seq < 0:
            raise ConfigError(f"max_intermediate_seq_len must be >= 0 (0 = MTP off), got {seq}")
        object.__setattr__(self, "max_intermediate_seq_len", seq)
        for name in ("recurrent_state_dtype", "conv_state_dtype"):
            object.__setattr__(self, name, _as_state_dtype(name, getattr(self, name)))
        for kind in ("recurrent", "conv"):
            name = f"intermediate_{kind}_state_dtype"
            value = getattr(self, name)
            dtype = getattr(self, f"{kind}_state_dtype") if value is None else _as_state_dtype(name, value)
            object.__setattr__(self, name, dtype)
        groups = _as_int("n_groups", self.n_groups)
        if groups < 1 or self.recurrent_state_num_heads % groups:
            raise ConfigError(
                f"n_groups must be >= 1 and divide recurrent_state_num_heads ({self.recurrent_state_num_heads}), "
                f"got {groups}"
            )
        object.__setattr__(self, "n_groups", groups)
        if self.replicated_groups and groups != 1:
            raise ConfigError(f"replicated_groups needs n_groups == 1 (one group on every rank), got n_groups={groups}")
        if self.commit_mode == "checkpoint":
            if seq < 1:
                raise ConfigError(
                    "max_intermediate_seq_len must be >= 1 with commit_mode='checkpoint' (the ring holds verify "
                    f"windows), got {seq}"
                )
            if history < seq:
                raise ConfigError(
                    f"history_len must be >= max_intermediate_seq_len ({seq}) with commit_mode='checkpoint' "
                    f"(a verify window must fit in the ring), got {history}"
                )

    # ------------------------------------------------------------------ shapes
    @property
    def enabled(self) -> bool:
        """True when the manager allocates anything (``num_recurrent_layers > 0``)."""
        return self.num_recurrent_layers > 0

    @property
    def has_intermediate_states(self) -> bool:
        """True when the per-step MTP state buffers are allocated (layers, ``S > 0``, scatter mode)."""
        return self.enabled and self.max_intermediate_seq_len > 0 and self.commit_mode == "scatter"

    @property
    def has_replay_stash(self) -> bool:
        """True when the replay stash is allocated (layers, ``S > 0``, replay mode)."""
        return self.enabled and self.max_intermediate_seq_len > 0 and self.commit_mode == "replay"

    @property
    def has_history(self) -> bool:
        """True when the checkpoint mode's history ring is allocated (layers, checkpoint mode)."""
        return self.enabled and self.commit_mode == "checkpoint"

    @property
    def _head_dims(self) -> tuple[int, int, int, int]:
        """``(H, D, N, G)``."""
        return self.recurrent_state_num_heads, self.recurrent_state_head_dim, self.recurrent_state_size, self.n_groups

    @property
    def replay_stash_fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The replay stash of one row and one draft step: field name to (shape, dtype).

        Mamba2: ``dA [H]`` (``exp(dt * A)``), ``u [H, D]`` (``dt * x``), ``B [G, N]``, float32, and
        the conv input column ``conv [C]`` in the conv dtype. Gated DeltaNet: ``g [H]`` (the decay
        factor), ``beta [H]``, ``k [G, D]``, ``v [H, N]``, float32, and ``conv [C]``.
        """
        f32 = np.dtype(np.float32)
        heads, dim, size, groups = self._head_dims
        if self.mixer == "mamba2":
            fields = {"dA": ((heads,), f32), "u": ((heads, dim), f32), "B": ((groups, size), f32)}
        else:
            fields = {
                "g": ((heads,), f32),
                "beta": ((heads,), f32),
                "k": ((groups, dim), f32),
                "v": ((heads, size), f32),
            }
        fields["conv"] = ((self.conv_dim,), self.conv_state_dtype)
        return fields

    @property
    def recurrent_state_shape(self) -> tuple[int, int, int, int]:
        """Per-layer recurrent state shape ``[B, H, D, N]``."""
        return (
            self.max_batch_size,
            self.recurrent_state_num_heads,
            self.recurrent_state_head_dim,
            self.recurrent_state_size,
        )

    @property
    def conv_state_shape(self) -> tuple[int, int, int]:
        """Per-layer conv state shape ``[B, C, K]``."""
        return (self.max_batch_size, self.conv_dim, self.conv_kernel)

    @property
    def intermediate_recurrent_state_shape(self) -> tuple[int, ...]:
        """Per-layer intermediate recurrent shape ``[B, S, H, D, N]`` (full size)."""
        return (self.max_batch_size, self.max_intermediate_seq_len, *self.recurrent_state_shape[1:])

    @property
    def intermediate_conv_state_shape(self) -> tuple[int, ...]:
        """Per-layer intermediate conv shape ``[B, S, C, K]`` (full size)."""
        return (self.max_batch_size, self.max_intermediate_seq_len, *self.conv_state_shape[1:])

    @property
    def recurrent_slot_elems(self) -> int:
        """Elements of one slot of one layer's recurrent state, ``H * D * N``."""
        return self.recurrent_state_num_heads * self.recurrent_state_head_dim * self.recurrent_state_size

    @property
    def conv_slot_elems(self) -> int:
        """Elements of one slot of one layer's conv state, ``C * K``."""
        return self.conv_dim * self.conv_kernel

    # ------------------------------------------------------------------ sharding
    @property
    def unsharded_num_heads(self) -> int:
        """H of the whole model: ``recurrent_state_num_heads * tp_size``."""
        return self.recurrent_state_num_heads * self.tp_size

    @property
    def unsharded_n_groups(self) -> int:
        """G of the whole model: ``n_groups``, times ``tp_size`` unless the groups are replicated."""
        return self.n_groups if self.replicated_groups else self.n_groups * self.tp_size

    @property
    def head_range(self) -> tuple[int, int]:
        """``[start, stop)``: the model's heads this rank holds (recurrent state ``[:, h - start]``)."""
        heads = self.recurrent_state_num_heads
        return (self.tp_rank * heads, (self.tp_rank + 1) * heads)

    @property
    def conv_sections(self) -> tuple[ConvSection, ...] | None:
        """The conv channels of this rank, section by section, and where each sits in the whole model.

        Mamba2 (``xBC``): ``x`` (``H * D`` channels, split with the heads), then ``B`` and ``C``
        (``G * N`` each, split with the groups, or whole on every rank with ``replicated_groups``).
        Gated DeltaNet: ``q`` and ``k`` (``G * D`` each: key heads of key dim ``D``), split with the
        key heads, then ``v`` (``H * N``: value heads of value dim ``N``), split with the heads.
        ``None`` when ``conv_dim`` is not the sum of the sections (a config whose conv channels
        follow no mixer layout: it can be moved between equal shards only).
        """
        heads, dim, size, groups = self._head_dims
        if self.mixer == "mamba2":
            layout = (("x", heads * dim, "heads"), ("B", groups * size, "groups"), ("C", groups * size, "groups"))
        else:
            layout = (("q", groups * dim, "groups"), ("k", groups * dim, "groups"), ("v", heads * size, "heads"))
        if sum(channels for _, channels, _ in layout) != self.conv_dim:
            return None
        sections, offset = [], 0
        for name, channels, split in layout:
            whole = split == "groups" and self.replicated_groups
            start = 0 if whole else self.tp_rank * channels
            sections.append(
                ConvSection(name, split, offset, channels, start, channels * (1 if whole else self.tp_size))
            )
            offset += channels
        return tuple(sections)

    # ------------------------------------------------------------------ bytes
    def pool_bytes(self) -> dict[str, int]:
        """Bytes of each pool, all layers together.

        Returns:
            ``{"recurrent", "conv", "intermediate_recurrent", "intermediate_conv", "replay_stash",
            "history"}`` to byte counts; all 0 when ``num_recurrent_layers == 0``; the intermediate
            ones 0 when MTP is off or not in scatter mode, the stash 0 unless in replay mode; the
            history (checkpoint mode only) is ``L * B * R`` steps of the replay stash's fields plus
            the per-slot counters (``h`` int32 and ``p0`` int64: 12 bytes a slot).
        """
        if not self.enabled:
            return dict.fromkeys(_POOLS, 0)
        layers, slots, seq = self.num_recurrent_layers, self.max_batch_size, self.max_intermediate_seq_len
        rec = layers * slots * self.recurrent_slot_elems
        conv = layers * slots * self.conv_slot_elems
        pools = {
            "recurrent": rec * self.recurrent_state_dtype.itemsize,
            "conv": conv * self.conv_state_dtype.itemsize,
            "intermediate_recurrent": 0,
            "intermediate_conv": 0,
            "replay_stash": 0,
            "history": 0,
        }
        if self.has_intermediate_states:
            pools["intermediate_recurrent"] = rec * seq * self.intermediate_recurrent_state_dtype.itemsize
            pools["intermediate_conv"] = conv * seq * self.intermediate_conv_state_dtype.itemsize
        if self.has_replay_stash:
            per_step = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.replay_stash_fields.values())
            pools["replay_stash"] = layers * slots * seq * per_step
        if self.has_history:
            per_step = sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.replay_stash_fields.values())
            pools["history"] = layers * slots * self.history_len * per_step + slots * _COUNTER_BYTES
        return pools

    @property
    def total_bytes(self) -> int:
        """Bytes of all pools together: what the manager allocates."""
        return sum(self.pool_bytes().values())

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot (one sequence) takes across every pool; every pool scales with B."""
        if not self.enabled:
            return 0
        return self.total_bytes // self.max_batch_size

    def max_batch_size_for(self, budget_bytes: int) -> int:
        """The largest ``max_batch_size`` whose pools fit in ``budget_bytes`` (0 if none fits).

        Raises:
            ConfigError: ``budget_bytes`` is negative or the config has no layers.
        """
        budget = _as_int("budget_bytes", budget_bytes)
        if budget < 0:
            raise ConfigError(f"budget_bytes must be >= 0, got {budget}")
        if not self.enabled:
            raise ConfigError("num_recurrent_layers must be >= 1 to size a batch")
        return budget // self.slot_bytes

    def shard(self, tp_size: int, replicated_conv_channels: int = 0, *, rank: int = 0) -> Config:
        """The config of one tensor-parallel rank: heads and conv channels split ``tp_size`` ways.

        Args:
            tp_size: ranks; must divide ``recurrent_state_num_heads`` and the split conv channels.
            replicated_conv_channels: conv channels every rank keeps whole (Mamba2's B and C
                channels, ``2 * n_groups * N``, when ``n_groups`` does not divide by ``tp_size``).
            rank: the rank, in ``[0, tp_size)`` (keyword only): recorded as ``tp_rank``.

        Returns:
            A config with ``H / tp_size`` heads and
            ``(C - replicated) / tp_size + replicated`` conv channels, ``tp_size`` and ``tp_rank``
            recorded (and ``replicated_groups`` when one group stays whole on every rank); the rest
            unchanged.

        Raises:
            ConfigError: ``tp_size`` < 1, it does not divide the heads or the split channels, a bad
                ``rank``, or this config is already a shard.
        """
        tp = _as_int("tp_size", tp_size)
        if tp < 1:
            raise ConfigError(f"tp_size must be >= 1, got {tp}")
        if self.tp_size != 1:
            raise ConfigError(
                f"shard: this config is already rank {self.tp_rank} of {self.tp_size}; shard the whole one"
            )
        replicated = _as_int("replicated_conv_channels", replicated_conv_channels)
        if not 0 <= replicated <= self.conv_dim:
            raise ConfigError(f"replicated_conv_channels must be in [0, {self.conv_dim}], got {replicated}")
        if self.recurrent_state_num_heads % tp:
            raise ConfigError(f"tp_size {tp} must divide recurrent_state_num_heads ({self.recurrent_state_num_heads})")
        split = self.conv_dim - replicated
        if split % tp:
            raise ConfigError(f"tp_size {tp} must divide the split conv channels ({split} of {self.conv_dim})")
        groups = self.n_groups
        if groups % tp == 0:
            groups //= tp
        elif groups != 1:  # one group is replicated on every rank; other counts must split
            raise ConfigError(f"tp_size {tp} must divide n_groups ({groups}) unless n_groups is 1")
        return dataclasses.replace(
            self,
            recurrent_state_num_heads=self.recurrent_state_num_heads // tp,
            conv_dim=split // tp + replicated,
            n_groups=groups,
            tp_size=tp,
            tp_rank=rank,
            replicated_groups=tp > 1 and self.n_groups == 1,
        )

    def in_commit_mode(self, mode: str) -> Config:
        """This config in another commit mode (``history_len`` kept, at least S, in checkpoint mode; else 0)."""
        history = max(self.history_len, self.max_intermediate_seq_len) if mode == "checkpoint" else 0
        return dataclasses.replace(self, commit_mode=mode, history_len=history)

    def memory_table(self, *, compare_commit_modes: bool = True) -> str:
        """A plain-text table of each pool's per-layer shape, dtype and bytes, with the total.

        Args:
            compare_commit_modes: with MTP on, also the per-step buffers of both commit modes side
                by side (``mamba-cache plan`` prints its own comparison instead).
        """
        rows = [("pool", "per-layer shape", "dtype", "bytes")]
        shapes = {
            "recurrent": (self.recurrent_state_shape, self.recurrent_state_dtype),
            "conv": (self.conv_state_shape, self.conv_state_dtype),
            "intermediate_recurrent": (
                self.intermediate_recurrent_state_shape,
                self.intermediate_recurrent_state_dtype,
            ),
            "intermediate_conv": (self.intermediate_conv_state_shape, self.intermediate_conv_state_dtype),
            "replay_stash": ((self.max_batch_size, self.max_intermediate_seq_len, "fields"), "mixed"),
            "history": ((self.max_batch_size, self.history_len, "fields"), "mixed"),
        }
        for pool, nbytes in self.pool_bytes().items():
            shape, dtype = shapes[pool]
            if nbytes:
                name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
                rows.append((pool, "[" + ", ".join(map(str, shape)) + "]", name, format_bytes(nbytes)))
        rows.append((f"total ({self.num_recurrent_layers} layers)", "", "", format_bytes(self.total_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if compare_commit_modes and self.enabled and self.max_intermediate_seq_len > 0:
            lines += ["", self._commit_mode_table()]
        return "\n".join(lines)

    def _commit_mode_table(self) -> str:
        """The speculative-decoding buffers of the scatter and replay modes side by side (same batch and S)."""
        modes = {mode: self.in_commit_mode(mode).pool_bytes() for mode in ("scatter", "replay")}
        per_step = {
            "scatter": modes["scatter"]["intermediate_recurrent"] + modes["scatter"]["intermediate_conv"],
            "replay": modes["replay"]["replay_stash"],
        }
        totals = {mode: sum(pools.values()) for mode, pools in modes.items()}
        rows = [
            ("commit_mode", "scatter (per-step states)", "replay (per-step stash)"),
            ("MTP buffers", format_bytes(per_step["scatter"]), format_bytes(per_step["replay"])),
            ("total", format_bytes(totals["scatter"]), format_bytes(totals["replay"])),
            ("MTP buffers, replay / scatter", "", f"{per_step['replay'] / per_step['scatter']:.4f}"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


class ConvSection(NamedTuple):
    """One section of a rank's conv channels (``Config.conv_sections``).

    Attributes:
        name: ``"x"``, ``"B"``, ``"C"`` (Mamba2) or ``"q"``, ``"k"``, ``"v"`` (Gated DeltaNet).
        split: ``"heads"`` or ``"groups"``: what the section is split with across ranks.
        offset: its first channel in this rank's conv state ``[C, K]``.
        channels: its channels on this rank.
        start: the model channel (within the whole section) of its first channel here.
        total: the section's channels in the whole model.
    """

    name: str
    split: str
    offset: int
    channels: int
    start: int
    total: int


_POOLS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv", "replay_stash", "history")
#: Bytes of the per-slot counters of checkpoint mode: ``h`` (int32) and ``p0`` (int64).
_COUNTER_BYTES = 4 + 8
