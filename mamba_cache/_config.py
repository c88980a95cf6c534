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

from .precision.quant8 import CONV_BLOCK, QUANT8_DTYPE_NAMES, RESIDUAL_DTYPE, is_quant8
from .precision.reference import bfloat16

__all__ = ["Config", "ConfigError", "ConvSection", "format_bytes"]

#: The state dtypes both backends support. The kernels copy raw words, so any fixed-size
#: floating type works; these are the ones an engine stores recurrent state in. bfloat16 comes
#: from ml_dtypes (the Numba backend stores it as uint16 raw bits).
SUPPORTED_DTYPES = (np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64))
#: The 8-bit state dtypes (``mamba_cache.precision.quant8``): stored with float32 scales per group.
QUANT8_DTYPES = tuple(np.dtype(name) for name in QUANT8_DTYPE_NAMES)
#: Every state dtype a config accepts, in the order error messages list them.
STATE_DTYPES = SUPPORTED_DTYPES + QUANT8_DTYPES
_ALLOWED = ", ".join(d.name for d in STATE_DTYPES)

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
        raise ConfigError(f"{name} must be a NumPy dtype ({_ALLOWED}), got {value!r}") from None
    if dtype not in STATE_DTYPES:
        raise ConfigError(f"{name} must be one of {_ALLOWED}, got {dtype.name}")
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
            ``float64``, or an 8-bit dtype: ``float8_e4m3fn``, ``float8_e5m2``, ``int8``, stored
            with float32 scales, see [`mamba_cache.precision.quant8`][mamba_cache.precision.quant8];
            normalised to a ``numpy.dtype``).
        conv_state_dtype: dtype of the conv and intermediate conv states (same choices).
        verify_writes_main_pool: True (the seed's behaviour) when the MTP verify pass also writes
            the state after all ``V`` tokens into the main pool, so a full accept needs no copy;
            False when it leaves the main pool untouched, so ``accept_lengths[b] == V`` commits
            step ``V - 1`` too. Normalised to False in replay and checkpoint mode (the verify pass
            never writes the main pools there).
        intermediate_recurrent_state_dtype: dtype of the per-step recurrent states; ``None`` (the
            default) means ``recurrent_state_dtype``. Commits convert in the same launch.
        intermediate_conv_state_dtype: likewise for the per-step conv states. An 8-bit per-step
            dtype must equal its main pool's (the plain 8-bit scatter copies values and scales).
        stochastic_rounding: round stochastically (instead of to nearest even) wherever a float32
            value, or a wider state, is stored into a 16-bit or 8-bit state.
        error_feedback: keep, per element of an 8-bit recurrent pool, the residual of its last
            store (bfloat16) and add it back before the next quantisation; needs an 8-bit recurrent
            pool whose per-step buffers (if any) are wider. (A conv column is quantised once, so
            there is nothing to feed back.)
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
    error_feedback: bool = False
    tp_size: int = 1
    tp_rank: int = 0
    replicated_groups: bool = False

    def __post_init__(self) -> None:
        for name in ("verify_writes_main_pool", "stochastic_rounding", "error_feedback", "replicated_groups"):
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
            main = getattr(self, f"{kind}_state_dtype")
            if is_quant8(dtype) and dtype != main:
                raise ConfigError(
                    f"{name} may be 8-bit only when it equals {kind}_state_dtype ({main.name}), got {dtype.name}: "
                    "the per-step states of an 8-bit pool are either 8-bit too or wider"
                )
        self._check_quant8()
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

    def _check_quant8(self) -> None:
        """The 8-bit combinations that are refused (the fields are normalised already)."""
        quant = self.quantised_kinds
        if self.error_feedback and "recurrent" not in quant:
            raise ConfigError(
                f"error_feedback needs an 8-bit recurrent_state_dtype ({', '.join(QUANT8_DTYPE_NAMES)}), got "
                f"{self.recurrent_state_dtype.name} (a conv column is quantised once and never again: "
                "there is nothing to feed back)"
            )
        if (
            self.error_feedback
            and self.has_intermediate_states
            and self.intermediate_recurrent_state_dtype.itemsize == 1
        ):
            raise ConfigError(
                "error_feedback needs a wider intermediate_recurrent_state_dtype than the 8-bit main pool, got "
                f"{self.intermediate_recurrent_state_dtype.name} (a plain 8-bit scatter copies the stored values: "
                "there is no residual to keep)"
            )
        if (
            "conv" in quant
            and self.has_intermediate_states
            and self.intermediate_conv_state_dtype.itemsize > 1
            and self.verify_writes_main_pool
        ):
            raise ConfigError(
                "verify_writes_main_pool must be False when an 8-bit conv pool takes wider per-step windows "
                f"(intermediate_conv_state_dtype={self.intermediate_conv_state_dtype.name}): the commit shifts the "
                "main window's stored columns and quantises only the new ones, so the verify pass must leave it"
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
        if is_quant8(self.conv_state_dtype):  # an 8-bit column carries its scales (one per 64 channels)
            fields["conv_scales"] = ((self.conv_scale_blocks,), np.dtype(np.float32))
        return fields

    @property
    def stash_step_bytes(self) -> int:
        """Bytes of one step of the replay stash (or history ring) for one row and one layer: every field."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.replay_stash_fields.values())

    # ------------------------------------------------------------------ 8-bit states
    @property
    def quantised_kinds(self) -> tuple[str, ...]:
        """The state kinds (``"recurrent"``, ``"conv"``) whose main pools are 8-bit, in that order."""
        if not self.enabled:
            return ()
        return tuple(k for k in ("recurrent", "conv") if is_quant8(getattr(self, f"{k}_state_dtype")))

    @property
    def conv_scale_blocks(self) -> int:
        """Blocks of 64 conv channels, ``ceil(C / 64)``: conv scale groups per column."""
        return -(-self.conv_dim // CONV_BLOCK)

    @property
    def recurrent_scale_shape(self) -> tuple[int, int, int]:
        """Per-layer shape of an 8-bit recurrent pool's scales, ``[B, H, D]`` (one per group of ``N``)."""
        return self.recurrent_state_shape[:3]

    @property
    def conv_scale_shape(self) -> tuple[int, int, int]:
        """Per-layer shape of an 8-bit conv pool's scales, ``[B, ceil(C / 64), K]``."""
        return (self.max_batch_size, self.conv_scale_blocks, self.conv_kernel)

    def scale_pools(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The stacked pools an 8-bit config adds, by name: shape (all layers) and dtype.

        ``scales_<pool>`` (float32) for each 8-bit main pool (``recurrent`` ``[L, B, H, D]``,
        ``conv`` ``[L, B, ceil(C / 64), K]``) and 8-bit per-step pool (flat per layer, as the
        per-step states are: ``[L, B*S*H*D]``, ``[L, B*S*ceil(C / 64)*K]``), and with
        ``error_feedback`` the 8-bit recurrent pool's residuals (``residual_recurrent``, bfloat16,
        ``[L, B, H, D, N]``). Empty for a config without 8-bit states.
        """
        pools: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        if not self.enabled:
            return pools
        layers, f32 = self.num_recurrent_layers, np.dtype(np.float32)
        scale_shapes = {"recurrent": self.recurrent_scale_shape, "conv": self.conv_scale_shape}
        for kind in self.quantised_kinds:
            pools[f"scales_{kind}"] = ((layers, *scale_shapes[kind]), f32)
        if self.has_intermediate_states:
            for kind in ("recurrent", "conv"):
                if is_quant8(getattr(self, f"intermediate_{kind}_state_dtype")):
                    per_slot = math.prod(scale_shapes[kind][1:])
                    pools[f"scales_intermediate_{kind}"] = (
                        (layers, self.max_batch_size * self.max_intermediate_seq_len * per_slot),
                        f32,
                    )
        if self.error_feedback:
            pools["residual_recurrent"] = ((layers, *self.recurrent_state_shape), RESIDUAL_DTYPE)
        return pools

    @property
    def residual_dtype(self) -> np.dtype:
        """The error-feedback residual's dtype (bfloat16)."""
        return RESIDUAL_DTYPE

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
            the per-slot counters (``h`` int32 and ``p0`` int64: 12 bytes a slot). ``"scales"`` are
            the float32 scales of the 8-bit main and per-step pools (an 8-bit stash or ring keeps
            its column scales as a field, counted there); ``"error_feedback"`` the bfloat16
            residuals of the 8-bit main pools with ``error_feedback`` on: allocated, but reported
            apart (capacity figures leave it out, see ``capacity_slot_bytes``).
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
            "scales": 0,
            "error_feedback": 0,
        }
        if self.has_intermediate_states:
            pools["intermediate_recurrent"] = rec * seq * self.intermediate_recurrent_state_dtype.itemsize
            pools["intermediate_conv"] = conv * seq * self.intermediate_conv_state_dtype.itemsize
        for name, (shape, dtype) in self.scale_pools().items():
            pools["error_feedback" if name.startswith("residual_") else "scales"] += math.prod(shape) * dtype.itemsize
        if self.has_replay_stash:
            pools["replay_stash"] = layers * slots * seq * self.stash_step_bytes
        if self.has_history:
            pools["history"] = layers * slots * self.history_len * self.stash_step_bytes + slots * _COUNTER_BYTES
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

    @property
    def capacity_slot_bytes(self) -> int:
        """``slot_bytes`` without the error-feedback residuals: what capacity targets compare."""
        if not self.enabled:
            return 0
        return (self.total_bytes - self.pool_bytes()["error_feedback"]) // self.max_batch_size

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
            "scales": ((self.max_batch_size, "groups"), "float32"),
            "error_feedback": ((self.max_batch_size, "elements"), RESIDUAL_DTYPE),
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


_POOLS = (
    "recurrent",
    "conv",
    "intermediate_recurrent",
    "intermediate_conv",
    "replay_stash",
    "history",
    "scales",
    "error_feedback",
)
#: Bytes of the per-slot counters of checkpoint mode: ``h`` (int32) and ``p0`` (int64).
_COUNTER_BYTES = 4 + 8
