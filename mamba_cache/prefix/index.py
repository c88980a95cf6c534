"""The prefix store's key index: lookups in both tiers, publishing keys, the longest match, placements, admission.

A mixin of [`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] (it reads the store's
bookkeeping: the device and host indexes, the index of off-grid tail lengths per block digest, the
policy's per-entry facts); it queues no copies, so it needs no device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..core.checks import check_size
from .keys import digest_chain, tail_digest, token_array
from .placement import Checkpoint, Query, plan

__all__ = ["KeyIndex", "PrefixHandle"]


class PrefixHandle(NamedTuple):
    """The result of a match (or insert): which entry, which generation of it, how many tokens.

    A handle stays valid until its entry is evicted or reused (its generation changes); pin it to
    hold it across inserts.

    Attributes:
        entry: the entry's index in its tier, ``[0, P)`` (or ``[0, P_host)`` when ``host``).
        generation: the entry's generation when the handle was made; a restore checks it, so a
            handle to an entry evicted or reused since then raises ``LookupError``.
        length: the tokens the checkpoint covers (any length >= 1, on the block grid or off it).
        host: the entry is in the host tier (a restore copies host to device); False for the
            device tier.
    """

    entry: int
    generation: int
    length: int
    host: bool = False  #: the entry is in the host tier (restore copies host to device)


class KeyIndex:
    """Lookups by key (the store's host logic that finds entries; see the module's docstring)."""

    def _forget_key(self, key: bytes) -> None:
        """A key leaves both tiers: drop its tail length from the index of its block digest."""
        tail = self._tail_of.pop(key, None)
        if tail is None:
            return
        base, rest, check = tail
        lengths = self._tails[base]
        checks = next(c for width, c in lengths if width == 4 * rest)
        checks[check] -= 1
        if not checks[check]:
            del checks[check]
            if not checks:
                left = tuple(pair for pair in lengths if pair[1] is not checks)
                if left:
                    self._tails[base] = left
                else:
                    del self._tails[base]

    def _add_tail(self, tail: tuple) -> None:
        """Count an off-grid key ``(d_q, r, check)`` in the index of its block digest (lengths longest first)."""
        base, rest, check = tail
        lengths = self._tails.get(base, ())
        checks = next((c for width, c in lengths if width == 4 * rest), None)
        if checks is None:
            checks = {}
            self._tails[base] = tuple(sorted((*lengths, (4 * rest, checks)), key=lambda pair: -pair[0]))
        checks[check] = checks.get(check, 0) + 1

    def _unlink(self, entry: int) -> None:
        """An evicted entry's children inherit its ancestor (their replay grows by its own)."""
        if not self.policy.needs_ancestors:
            return
        parent, replay, children = self._parent[entry], self._facts.replay, self._facts.children
        for child in self._children.pop(entry, ()):
            self._parent[child] = parent
            replay[child] += replay[entry]
            if parent >= 0:
                self._children.setdefault(parent, set()).add(child)
                children[parent] += 1
        if parent >= 0:
            self._children[parent].discard(entry)
            children[parent] -= 1
        self._parent[entry] = -1
        replay[entry] = children[entry] = 0

    def _tick(self, entry: int) -> None:
        self._clock += 1
        self._facts.used[entry] = self._clock

    def _lookup(self, key: bytes) -> PrefixHandle | None:
        """The handle of ``key`` in either tier (refreshing its recency), or None."""
        entry = self._index.get(key)
        if entry is not None:
            self._lru.move_to_end(entry)
            self._tick(entry)
            return self._handle(entry)
        host = self._hindex.get(key)
        if host is not None:
            self._hlru.move_to_end(host)
            return PrefixHandle(host, self._hgenerations[host], self._hlengths[host], True)
        return None

    def _admit(self, data: np.ndarray, kind: str | None) -> bool:
        """The policy's admission of a checkpoint after ``data`` offered as ``kind`` (counts a refusal)."""
        policy = self.policy
        shared = False
        if policy.needs_sharing and kind == "block" and self._radix is not None:
            chain = digest_chain(data, self.block_size, self._root, data.shape[0] // self.block_size)
            shared = bool(chain) and self._radix.passes(chain[-1]) >= 2
        if policy.admit(data.shape[0], kind, shared):
            return True
        self.stats.rejected_inserts += 1
        return False

    def _publish(
        self, entry: int, key: bytes, data: np.ndarray, tail: tuple | None, kind: str | None = None
    ) -> PrefixHandle:
        length = data.shape[0]
        self._keys[entry] = key
        self._kinds[entry] = kind
        self._lengths[entry] = length
        self._facts.lengths[entry] = length
        self._generations[entry] += 1
        self._index[key] = entry
        self._lru[entry] = None
        self._tick(entry)
        if tail is not None:
            self._tail_of[key] = tail
            self._add_tail(tail)
        if self.policy.needs_ancestors:
            ancestor = self._longest(data, length - 1, device_only=True)
            parent = -1 if ancestor is None else ancestor.entry
            self._parent[entry] = parent
            self._facts.replay[entry] = length - (0 if ancestor is None else ancestor.length)
            if parent >= 0:
                self._children.setdefault(parent, set()).add(entry)
                self._facts.children[parent] += 1
        self.stats.inserts += 1
        return self._handle(entry)

    # ------------------------------------------------------------ match
    def match(self, tokens: Any, max_tokens: int | None = None) -> PrefixHandle | None:
        """The longest cached prefix of ``tokens``, on the block grid or off it, that leaves a token to run.

        The matched length ``n`` satisfies ``n < len(tokens)`` (the caller still gets logits) and
        ``n <= max_tokens`` (a hybrid model passes its attention KV hit length). Only the matched
        entry's recency is refreshed. No match is a result (``None``), not an error.

        Cost: one block digest per whole block of the prompt below the limit, plus, for each
        off-grid length registered under those block digests (an index of tail lengths per block
        digest), a 64-bit hash of that many tokens, and a tail digest only where the hash equals a
        stored tail's (never a digest per token).

        Args:
            tokens: ``[T]`` host integer token ids (int32 range).
            max_tokens: optional upper bound on the matched length, >= 0.

        Returns:
            A [`PrefixHandle`][mamba_cache.prefix.PrefixHandle] ``(entry, generation, length)``, or ``None``.

        Raises:
            TypeError / ValueError: ``tokens`` is not 1-D integers, or ``max_tokens`` is not an int >= 0.
        """
        self._check_open("match")
        data = token_array("tokens", tokens)
        limit = data.shape[0] - 1
        if max_tokens is not None:
            limit = min(limit, check_size("max_tokens", max_tokens, 0, 2**63 - 1))
        stats = self.stats
        stats.lookups += 1
        stats.prompt_tokens += data.shape[0]
        if self._guard is not None:
            self._guard.seen(data.shape[0])
        if self._radix is not None:
            whole = data.shape[0] // self.block_size
            self._radix.observe(data, [self._root, *digest_chain(data, self.block_size, self._root, whole)])
        handle = self._longest(data, limit)
        if handle is not None:
            stats.hits += 1
            stats.hit_tokens += handle.length
            stats.host_hits += handle.host
            if handle.length % self.block_size:
                stats.offgrid_hits += 1
            else:
                stats.grid_hits += 1
        return handle

    def _longest(self, data: np.ndarray, limit: int, device_only: bool = False) -> PrefixHandle | None:
        """The handle of the longest cached prefix of ``data`` of at most ``limit`` tokens (refreshed), or None."""
        bs = self.block_size
        blocks = max(0, limit) // bs
        chain = digest_chain(data, bs, self._root, blocks) if blocks else []
        tails, lookup = self._tails, (self._device_lookup if device_only else self._lookup)
        raw = data.tobytes() if tails else b""  # one copy of the prompt; a tail's bytes are a slice of it
        end, step = 4 * limit, 4 * bs  # in bytes
        for q in range(blocks, -1, -1):  # at each q: its tails (longer first), then its block key
            base = chain[q - 1] if q else self._root
            lengths = tails.get(base) if tails else None
            if lengths:
                start = q * step
                for width, checks in lengths:
                    # a check is a 64-bit hash of a stored tail's bytes: none equal, no stored tail can match
                    if start + width <= end and hash(raw[start : start + width]) in checks:
                        handle = lookup(tail_digest(base, data[q * bs : (start + width) // 4]))
                        if handle is not None:
                            return handle
            if q:
                handle = lookup(base)
                if handle is not None:
                    return handle
        return None

    def _superseded(self, data: np.ndarray, keep: set | frozenset) -> int | None:
        """The device entry a new checkpoint after ``data`` supersedes, for a policy that ``drops_superseded``.

        Its nearest cached ancestor, when the new checkpoint is about to be its one cached extension,
        unless pinned, in ``keep``, or inserted as a branch point (a prefix two requests shared, whose
        other extensions may still come); else None.
        """
        if not (self.policy.drops_superseded and self.policy.needs_ancestors):
            return None
        ancestor = self._longest(data, data.shape[0] - 1, device_only=True)
        if ancestor is None:
            return None
        entry = ancestor.entry
        if self._facts.children[entry] or self._kinds[entry] == "branch_point" or self._pins[entry] or entry in keep:
            return None
        return entry

    def _device_lookup(self, key: bytes) -> PrefixHandle | None:
        """A device entry's handle for ``key`` (recency untouched), or None."""
        entry = self._index.get(key)
        return None if entry is None else self._handle(entry)

    # ------------------------------------------------------------ placement
    def positions(self, tokens: Any, prompt_length: int | None = None, start: int = 0) -> list[Checkpoint]:
        """Where the engine should checkpoint this request, by the store's placement.

        Args:
            tokens: ``[T]`` host integer token ids: the prompt, then any tokens sampled since.
            prompt_length: tokens of the prompt (default: all of ``tokens``). When ``T`` exceeds it,
                the last token is a sampled one the state has not consumed yet, so the state has run
                ``T - 1`` tokens; otherwise all ``T``.
            start: positions at or below it are already covered (pass the matched length).

        Returns:
            [`Checkpoint`][mamba_cache.prefix.placement.Checkpoint] ``(length, kind)`` in ascending
            order, each ``0 < length <= consumed`` and ``> start``: take the state after ``length``
            tokens and pass it to ``insert(tokens[:length], slot, kind=kind)``.

        Raises:
            TypeError / ValueError: bad ``tokens``; ``prompt_length`` not in ``[0, T]``; ``start`` < 0.
        """
        self._check_open("positions")
        data = token_array("tokens", tokens)
        total = data.shape[0]
        prompt = total if prompt_length is None else check_size("prompt_length", prompt_length, 0, total)
        start = check_size("start", start, 0, 2**63 - 1)
        consumed = total - 1 if total > prompt else total
        branch = 0
        if self.placement.uses_radix and self._radix is not None:
            whole = prompt // self.block_size
            chain = [self._root, *digest_chain(data, self.block_size, self._root, whole)]
            branch = self._radix.branch_point(data, chain, prompt)
        query = Query(data, prompt, consumed, start, self.block_size, branch)
        return plan(self.placement, query)
