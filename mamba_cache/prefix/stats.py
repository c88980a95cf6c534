"""A prefix store's counters, and the guardrail that warns when its block size cannot hit."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["BlockSizeWarning", "PrefixStats"]


class BlockSizeWarning(UserWarning):
    """The store's block size exceeds most prompts it has seen: checkpoints on the block grid cannot hit."""


@dataclass
class PrefixStats:
    """Counters of a store (all since construction); ``str()`` adds ``hit_rate`` and ``token_hit_rate``.

    Attributes:
        lookups: ``match`` calls.
        hits: matches that found a checkpoint (``grid_hits + offgrid_hits``).
        grid_hits: hits on a checkpoint after a multiple of the block size.
        offgrid_hits: hits on a checkpoint off the block grid.
        host_hits: hits served from the host tier (grid or off-grid).
        hit_tokens: prompt tokens covered by those checkpoints: the prompt tokens skipped (prefill saved).
        prompt_tokens: tokens of every matched prompt (``hit_tokens / prompt_tokens``: the token hit rate).
        inserts: checkpoints written (``insert`` copies and ``publish``).
        dropped_inserts: inserts / reserves refused because every entry was pinned.
        rejected_inserts: inserts the policy did not admit (a checkpoint it judged not reusable).
        evictions: entries evicted to make room.
        offloads: evicted device entries copied into the host tier.
    """

    lookups: int = 0  #: ``match`` calls
    hits: int = 0  #: matches that found a checkpoint
    grid_hits: int = 0  #: hits on a checkpoint at a multiple of the block size
    offgrid_hits: int = 0  #: hits on a checkpoint off the block grid
    host_hits: int = 0  #: hits served from the host tier
    hit_tokens: int = 0  #: prompt tokens covered by those checkpoints (prefill saved)
    prompt_tokens: int = 0  #: tokens of every matched prompt
    inserts: int = 0  #: checkpoints written (``insert`` copies and ``publish``)
    dropped_inserts: int = 0  #: inserts / reserves refused because every entry was pinned
    rejected_inserts: int = 0  #: inserts the policy did not admit
    evictions: int = 0  #: entries evicted to make room
    offloads: int = 0  #: evicted device entries copied into the host tier

    def __str__(self) -> str:
        rate = self.hits / self.lookups if self.lookups else 0.0
        tokens = self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        counters = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"PrefixStats({counters}, hit_rate={rate:.3f}, token_hit_rate={tokens:.3f})"


class BlockSizeGuard:
    """Warns once (``BlockSizeWarning``, with the numbers) when most prompts seen are no longer than a block.

    A prompt of ``T <= bs`` tokens can hit only a checkpoint off the block grid (a grid checkpoint
    must leave a token to run), so with grid placements such a store never hits. The guard looks
    at the first ``window`` prompts of at least one token and warns if more than half are that short.
    """

    def __init__(self, block_size: int, window: int = 32) -> None:
        self.block_size = block_size
        self.window = window
        self._lengths: list[int] | None = []

    def seen(self, length: int) -> None:
        """Note a matched prompt of ``length`` tokens (cheap once the guard has decided)."""
        if self._lengths is None:
            return
        self._lengths.append(length)
        if len(self._lengths) < self.window:
            return
        lengths, self._lengths = np.array(self._lengths), None
        short = int((lengths <= self.block_size).sum())
        if 2 * short > lengths.size:
            warnings.warn(
                f"prefix store: block_size {self.block_size} is at least the length of {short} of the first "
                f"{lengths.size} prompts (median {int(np.median(lengths))} tokens): checkpoints on the block grid "
                "cannot hit them; checkpoint off the grid (placement 'end_of_prompt', 'end_of_request' or "
                "'branch_point') or use a smaller block_size",
                BlockSizeWarning,
                stacklevel=3,
            )
