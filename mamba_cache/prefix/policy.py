"""What a prefix store keeps: the eviction and admission policies, by name.

A policy decides two things for the device tier of a
[`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache]:

- admission: whether a checkpoint offered to ``insert`` is worth an entry at all;
- eviction: which unpinned entry a full store gives up for a new one.

The store hands a policy only the candidates it may evict (published, not pinned, not reserved,
not taken by the same batched insert), so a policy can never evict a pinned entry.

Policies, by name:

- ``lru`` (the default): admit everything; evict the least recently used entry.
- ``flop_aware``: Marconi's rule (Pan et al., "Marconi: Prefix Caching for the Era of Hybrid LLMs",
  MLSys 2025, arXiv 2411.19379). Utility = recency + ``alpha`` x FLOP efficiency, each scaled to
  ``[0, 1]`` over the candidates; FLOP efficiency = the FLOPs a hit on the entry saves (``flops(n)``
  for a checkpoint after ``n`` tokens) per byte the entry holds (one entry = one slot of state, the
  same bytes for every entry). The lowest utility is evicted, among Marconi's candidates first: an
  entry that is a branch point (two or more cached extensions, each with it as nearest cached
  ancestor) is evicted only when nothing else can be. Ours, stated: an entry with exactly one cached
  extension is superseded by it (every request that would hit it and goes on along the chain hits
  the longer one: a chat's earlier turn once the next turn is cached) and goes before any other.
  With ``at_once`` (the default), a full store drops it the moment it is superseded: a new
  checkpoint whose nearest cached ancestor has no other cached extension takes that ancestor's
  entry (unless it is pinned, or was inserted as a ``branch_point``: a prefix two requests shared,
  whose other extensions are yet to come), instead of evicting another entry now and the
  superseded one at the next insert (which cost a live entry per insert: on a chat at block size
  528 with 11 entries for 16 open conversations, 1.42x the baseline's hit tokens without it).
  Admission: only checkpoints that can be reused: a checkpoint a placement offers as a plain block
  boundary (kind ``"block"``) is admitted only where the store has seen a second request pass that
  boundary; ends of prompts and requests, branch points and direct inserts (no kind) are admitted.
- ``seglen``: the SegLen rule (Abdelfattah lab, "Rethinking Prefix Caching for Hybrid LLMs", 2026,
  and its SGLang eviction policy ``--radix-eviction-policy seglen``): utility = (1 - ``weight``) x
  recency + ``weight`` x replay length, scaled to ``[0, 1]``, where the replay length of an entry is
  the tokens a request would have to recompute if the entry were gone: its length minus the length
  of its nearest cached ancestor (a shorter checkpoint of the same prefix, on the device). Model
  agnostic: no FLOP model. Default weight 0.85 (SGLang's ``--marconi-eff-weight`` example).
  Ancestors are found when an entry is inserted; an ancestor inserted later does not shorten an
  existing entry's replay length (it is an upper bound), an evicted ancestor lengthens it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

__all__ = ["POLICIES", "FlopAware", "Lru", "Policy", "SegLen", "make_policy"]


class Policy:
    """The interface: ``admit`` and ``victim``; the store keeps the per-entry facts they read.

    Attributes:
        name: the policy's name (``lru``, ``flop_aware``, ``seglen``).
        needs_ancestors: the store must find each new entry's nearest cached ancestor.
        needs_sharing: the store must keep a radix view of the requests it matched (to tell a
            block boundary a second request passed from one only this request reached).
        drops_superseded: in a full store, a new checkpoint takes the entry of its nearest cached
            ancestor when that ancestor has no other cached extension (``victim`` is not asked; only
            with ``needs_ancestors``, which counts the extensions).
    """

    name = "policy"
    needs_ancestors = False
    needs_sharing = False
    drops_superseded = False

    def admit(self, length: int, kind: str | None, shared: bool) -> bool:
        """Whether a checkpoint after ``length`` tokens, offered as ``kind``, may take an entry."""
        return True

    def victim(self, candidates: Iterable[int], facts: EntryFacts) -> int | None:
        """The entry to evict among ``candidates`` (least recently used first), or None if there is none."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EntryFacts:
    """Per-entry facts a policy reads (device tier, ``P`` entries): recency, lengths, replay lengths.

    Attributes:
        used: ``[P]`` int64, the store's clock at the entry's last publish or hit (larger: more recent).
        lengths: ``[P]`` int64, tokens the entry covers (0: empty).
        replay: ``[P]`` int64, its length minus its nearest cached ancestor's (``seglen``).
        children: ``[P]`` int64, cached entries whose nearest cached ancestor it is (``flop_aware``).
    """

    def __init__(self, entries: int) -> None:
        self.used = np.zeros(entries, np.int64)
        self.lengths = np.zeros(entries, np.int64)
        self.replay = np.zeros(entries, np.int64)
        self.children = np.zeros(entries, np.int64)


class Lru(Policy):
    """Least recently used (the store's default; every insert admitted)."""

    name = "lru"

    def victim(self, candidates: Iterable[int], facts: EntryFacts) -> int | None:
        """The first candidate: the least recently used."""
        return next(iter(candidates), None)  # the store lists candidates least recent first


def _scaled(values: np.ndarray) -> np.ndarray:
    """``values`` scaled to ``[0, 1]`` (all equal: zeros)."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values, dtype=np.float64)


def _lowest(candidates: Iterable[int], score: Callable[[np.ndarray], np.ndarray]) -> int | None:
    """The candidate of lowest score (ties: the earliest listed, i.e. the least recent)."""
    ids = np.fromiter(candidates, dtype=np.int64)
    if not ids.size:
        return None
    return int(ids[int(np.argmin(score(ids)))])


class FlopAware(Policy):
    """Marconi: evict the lowest recency + ``alpha`` x FLOPs-saved-per-byte; admit only reusable checkpoints.

    Args:
        flops: FLOPs a hit on a checkpoint after ``n`` tokens saves, as a function of ``n``
            (vectorised over an int64 array); default ``n`` itself (cost linear in the prefix).
        alpha: weight of the FLOP efficiency against recency (Marconi tunes it per workload; 1.0).
        entry_bytes: bytes one entry holds (scales the efficiency; every entry holds the same).
        at_once: a full store drops a superseded entry the moment it is superseded (its one cached
            extension takes its entry); False: it goes at the next eviction, as the first victim.
    """

    name = "flop_aware"
    needs_sharing = True
    needs_ancestors = True

    def __init__(
        self,
        flops: Callable[[np.ndarray], np.ndarray] | None = None,
        alpha: float = 1.0,
        entry_bytes: int = 1,
        at_once: bool = True,
    ):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.flops = flops or (lambda n: n.astype(np.float64))
        self.alpha = float(alpha)
        self.entry_bytes = max(1, int(entry_bytes))
        self.drops_superseded = bool(at_once)

    def admit(self, length: int, kind: str | None, shared: bool) -> bool:
        """Refuse a plain block boundary (kind ``block``) no second request has passed."""
        return kind != "block" or shared

    def victim(self, candidates: Iterable[int], facts: EntryFacts) -> int | None:
        """The lowest recency + ``alpha`` x FLOPs saved per byte; superseded entries first, branch points last."""

        def score(ids):
            efficiency = np.asarray(self.flops(facts.lengths[ids]), dtype=np.float64) / self.entry_bytes
            utility = _scaled(facts.used[ids].astype(np.float64)) + self.alpha * _scaled(efficiency)
            children = facts.children[ids]
            return utility + np.where(children == 1, -3.0, np.where(children > 1, 3.0, 0.0))

        return _lowest(candidates, score)

    def __repr__(self) -> str:
        return f"FlopAware(alpha={self.alpha}, at_once={self.drops_superseded})"


class SegLen(Policy):
    """SegLen: evict the lowest (1 - ``weight``) x recency + ``weight`` x replay length to the nearest ancestor."""

    name = "seglen"
    needs_ancestors = True

    def __init__(self, weight: float = 0.85):
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        self.weight = float(weight)

    def victim(self, candidates: Iterable[int], facts: EntryFacts) -> int | None:
        """The candidate of lowest (1 - ``weight``) x recency + ``weight`` x replay length."""

        def score(ids):
            recency = _scaled(facts.used[ids].astype(np.float64))
            return (1 - self.weight) * recency + self.weight * _scaled(facts.replay[ids].astype(np.float64))

        return _lowest(candidates, score)

    def __repr__(self) -> str:
        return f"SegLen(weight={self.weight})"


#: The policies by name (each called with no arguments gives its documented defaults).
POLICIES = {"lru": Lru, "flop_aware": FlopAware, "seglen": SegLen}


def make_policy(policy: str | Policy) -> Policy:
    """A policy from its name (``lru``, ``flop_aware``, ``seglen``) or an instance (returned as is).

    Raises:
        ValueError: an unknown name. TypeError: neither a name nor a ``Policy``.
    """
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a policy name or a Policy, got {type(policy).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    return POLICIES[policy]()
