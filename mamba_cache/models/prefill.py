"""The chunked prefill's arguments, checked once for both backends, and where its states go.

[`TinyMamba2.prefill_chunked`][mamba_cache.models.mamba2.TinyMamba2.prefill_chunked] (and the Gated
DeltaNet model's, which inherits it) runs a prompt through one slot chunk by chunk and writes the
state after each requested position into a destination in the same pass. Every check happens here,
before any state is touched, so a refused call changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.backend import EntryStore
from ..core.checks import INT32_MAX, check_index, check_size
from ..precision.reference import rounds_stochastically

__all__ = ["PrefillPlan", "plan_prefill"]


@dataclass(frozen=True)
class PrefillPlan:
    """A checked chunked prefill.

    Attributes:
        tokens: ``[T]`` int64 token ids.
        slot: the live slot advanced through the prompt.
        chunk: ``Q``, tokens per chunk (``chunk_size``, at most ``T``: a longer chunk is the same single chunk).
        start: tokens the slot's state had consumed before the prompt (stochastic rounding keys).
        positions: ``[n]`` int64 checkpoint positions, each in ``[1, T]`` (tokens of this prompt consumed).
        targets: ``[n]`` int64 destination of each: a store entry or a slot.
        store: the store when ``targets`` are its entries, else ``None`` (``targets`` are slots).
    """

    tokens: np.ndarray
    slot: int
    chunk: int
    start: int
    positions: np.ndarray
    targets: np.ndarray
    store: EntryStore | None

    @property
    def entry_pools(self) -> tuple | None:
        """The store's ``(recurrent [L, P, ...], conv [L, P, ...])`` entries, or ``None`` for slot targets."""
        return None if self.store is None else self.store.entry_pools


def _int_list(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must be a 1-D sequence of integers, got {array.dtype} of shape {array.shape}")
    return array.astype(np.int64)


def plan_prefill(
    model: Any,
    cache: Any,
    tokens: Any,
    slot: Any,
    chunk_size: Any,
    checkpoints: Any,
    store: Any,
    entries: Any,
    checkpoint_slots: Any,
    position: Any,
) -> PrefillPlan:
    """Check a chunked prefill's arguments (see ``TinyMamba2.prefill_chunked``); raise before anything changes.

    Raises:
        ValueError: checkpoint commit mode; an empty or non-1-D prompt, a token outside ``[0, vocab)``;
            ``chunk_size`` < 1; a checkpoint outside ``[1, T]`` or given twice; destinations missing, given
            both ways, of another count than the checkpoints, repeated, naming ``slot``, or entries not
            reserved in ``store``; ``position`` < 0 or missing where states round stochastically; a store
            of another manager.
        IndexError: ``slot`` or a checkpoint slot outside ``[0, B)``, an entry outside ``[0, P)``.
        TypeError: an argument of the wrong type.
    """
    config = cache.get_config()
    if config.commit_mode == "checkpoint":
        raise ValueError(
            "prefill_chunked writes the main pools, which hold checkpoints in commit_mode='checkpoint'; use prefill "
            "(a checkpoint-mode decode per token) there; nothing was changed"
        )
    ids = _int_list("tokens", tokens)
    if ids.size == 0:
        raise ValueError("tokens must hold at least one token id; nothing was changed")
    if ids.min() < 0 or ids.max() >= model.vocab_size:
        raise ValueError(
            f"tokens must be ids in [0, {model.vocab_size}), got values in [{ids.min()}, {ids.max()}]; "
            "nothing was changed"
        )
    batch = config.max_batch_size
    slot = check_index("slot", slot, batch)
    length = ids.shape[0]
    chunk = min(check_size("chunk_size", chunk_size, 1, INT32_MAX), length)  # one chunk at most the prompt
    positions = _int_list("checkpoints", checkpoints)
    if positions.size and (positions.min() < 1 or positions.max() > length):
        raise ValueError(
            f"checkpoints must be positions in [1, {length}] (tokens of this prompt consumed), got "
            f"{positions.tolist()}; nothing was changed"
        )
    if np.unique(positions).size != positions.size:
        raise ValueError(f"checkpoints must be distinct, got {positions.tolist()}; nothing was changed")
    if position is None:
        dtypes = (config.recurrent_state_dtype, config.conv_state_dtype)
        if any(rounds_stochastically(config.stochastic_rounding, dtype) for dtype in dtypes):
            raise ValueError("position is required: the cache rounds its 16-bit states stochastically")
        position = 0
    start = check_size("position", position, 0, INT32_MAX)
    given = [
        name for name, value in (("entries", entries), ("checkpoint_slots", checkpoint_slots)) if value is not None
    ]
    if len(given) == 2:
        raise ValueError("give either entries (with store) or checkpoint_slots, not both; nothing was changed")
    if positions.size and not given:
        raise ValueError("checkpoints need destinations: entries (with store) or checkpoint_slots")
    targets = np.zeros(0, np.int64)
    if given:
        targets = _int_list(given[0], entries if entries is not None else checkpoint_slots)
        if targets.shape[0] != positions.shape[0]:
            raise ValueError(
                f"{given[0]} must name one destination per checkpoint ({positions.shape[0]}), got {targets.shape[0]}; "
                "nothing was changed"
            )
    if entries is not None:
        if not isinstance(store, EntryStore):
            raise TypeError(f"entries need store= the PrefixStateCache that reserved them, got {type(store).__name__}")
        store.check_tracking(cache, "prefill_chunked")
        for i, entry in enumerate(targets.tolist()):
            check_index(f"entries[{i}]", entry, store.entries)
        store.check_tracked_entries(targets)  # distinct and reserved
    else:
        if store is not None:
            raise ValueError("store is given without entries; nothing was changed")
        for i, target in enumerate(targets.tolist()):
            check_index(f"checkpoint_slots[{i}]", target, batch)
        if np.unique(targets).size != targets.size or (targets == slot).any():
            raise ValueError(
                f"checkpoint_slots must be distinct slots other than slot {slot}, got {targets.tolist()}; "
                "nothing was changed"
            )
    return PrefillPlan(ids, slot, chunk, start, positions, targets, store if entries is not None else None)
