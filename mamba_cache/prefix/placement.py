"""Where a request should be checkpointed: the placements, by name, and the radix view they read.

A placement is a query the store answers for a request's tokens: the positions (token counts) after
which the engine should take a checkpoint and ``insert`` it. The engine calls
[`PrefixStateCache.positions`][mamba_cache.prefix.PrefixStateCache.positions] with the request's
tokens so far (prompt, then any sampled tokens) and the prompt's length; the state has consumed every
token but the last sampled one (which has not run yet), so no position ever lies past that.

Placements, by name (join several with ``+``, e.g. ``"branch_point+end_of_request"``):

- ``every_block`` (the default): every multiple of the block size the state passes.
- ``end_of_prompt``: the prompt's last token (the next turn of a chat starts with this prompt).
- ``end_of_request``: every token the state has consumed (prompt and all sampled tokens but the last).
- ``branch_point``: where the prompt leaves the requests the store has matched before (found by a
  radix view of their keys): the longest prefix it shares with another request. Marconi admits
  exactly these and sequence ends.
- ``before_end:N``: ``N`` tokens before the end of the prompt (a chat template's fixed tail, e.g.
  the assistant header, is then left to run).

Each position comes with its kind (the placement's name; ``block`` for ``every_block``), which the
engine passes on to ``insert`` so the policy can judge admission.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import numpy as np

__all__ = ["PLACEMENTS", "Checkpoint", "Placement", "RadixView", "make_placement"]


class Checkpoint(NamedTuple):
    """A position to checkpoint: after ``length`` tokens, for the reason ``kind``."""

    length: int
    kind: str


class RadixView:
    """A radix tree over the requests a store matched, one node per block digest.

    Node ``d_q`` (``q`` whole blocks) records how many matched requests passed it and the distinct
    continuations that followed it (up to one block of tokens each, at most ``fanout`` kept). Its
    size is bounded: past ``max_nodes`` nodes the least recently passed ones are forgotten.

    Args:
        block_size: ``bs`` of the store.
        max_nodes: nodes kept (host memory: about ``4 * bs`` bytes of tokens per continuation).
        fanout: continuations kept per node.
    """

    def __init__(self, block_size: int, max_nodes: int = 1 << 16, fanout: int = 8) -> None:
        self.block_size = block_size
        self.max_nodes = max_nodes
        self.fanout = fanout
        self._nodes: OrderedDict[bytes, list] = OrderedDict()  # digest -> [passes, [continuations]]

    def __len__(self) -> int:
        return len(self._nodes)

    def observe(self, data: np.ndarray, chain: list[bytes]) -> None:
        """Record a request: ``chain`` = ``[d_0, ..., d_Q]`` of its whole blocks, ``data`` its tokens."""
        bs, nodes = self.block_size, self._nodes
        for q, digest in enumerate(chain):
            node = nodes.get(digest)
            if node is None:
                node = nodes[digest] = [0, []]
            else:
                nodes.move_to_end(digest)
            node[0] += 1
            self._add_continuation(node[1], data[q * bs : (q + 1) * bs])
        while len(nodes) > self.max_nodes:
            nodes.popitem(last=False)

    def _add_continuation(self, kept: list, tail: np.ndarray) -> None:
        """Count ``tail`` among the kept ``[tokens, times seen]`` (an extension of a kept one replaces it)."""
        if not tail.size:
            return
        for item in kept:
            other = item[0]
            common = min(other.size, tail.size)
            if np.array_equal(other[:common], tail[:common]):
                if tail.size > other.size:
                    item[0] = tail.copy()
                item[1] += 1
                return
        if len(kept) < self.fanout:
            kept.append([tail.copy(), 1])

    def passes(self, digest: bytes) -> int:
        """Matched requests that passed block digest ``digest`` (0: unknown)."""
        node = self._nodes.get(digest)
        return node[0] if node is not None else 0

    def branch_point(self, data: np.ndarray, chain: list[bytes], limit: int) -> int:
        """The longest prefix of ``data`` (at most ``limit`` tokens) that another matched request shares; 0: none.

        Walks the whole blocks another request also passed (a node passed at least twice, this
        request included), then compares the next tokens with the continuations kept there.
        """
        bs = self.block_size
        q = 0
        while q + 1 < len(chain) and (q + 1) * bs <= limit and self.passes(chain[q + 1]) >= 2:
            q += 1
        best = q * bs if q and self.passes(chain[q]) >= 2 else 0
        node = self._nodes.get(chain[q])
        if node is None:
            return min(best, limit)
        segment = data[q * bs : min((q + 1) * bs, limit)]
        for other, seen in node[1]:
            common = min(other.size, segment.size)
            if not common:
                continue
            differs = np.flatnonzero(other[:common] != segment[:common])
            same = int(differs[0]) if differs.size else common
            if same == segment.size and seen < 2:
                continue  # this request's own continuation, seen once: nobody else went this far
            best = max(best, q * bs + same)
        return min(best, limit)


class Placement:
    """A named rule: ``positions`` of a request (see the module's docstring for the names)."""

    name = "placement"
    uses_radix = False

    def positions(self, query: Query) -> list[Checkpoint]:
        """The positions this rule names for ``query`` (the store keeps those in ``(start, consumed]``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Query(NamedTuple):
    """What a placement sees of a request (built by the store)."""

    tokens: np.ndarray  #: the request's tokens so far (checked int32)
    prompt_length: int
    consumed: int  #: tokens the state has run: every token but a last sampled one
    start: int  #: positions at or below it are already covered (the matched length)
    block_size: int
    branch: int  #: the radix view's branch point (0 if none or not asked for)


class EveryBlock(Placement):
    name = "every_block"

    def positions(self, query: Query) -> list[Checkpoint]:
        bs = query.block_size
        return [Checkpoint(n, "block") for n in range((query.start // bs + 1) * bs, query.consumed + 1, bs)]


class EndOfPrompt(Placement):
    name = "end_of_prompt"

    def positions(self, query: Query) -> list[Checkpoint]:
        return [Checkpoint(min(query.prompt_length, query.consumed), self.name)]


class EndOfRequest(Placement):
    name = "end_of_request"

    def positions(self, query: Query) -> list[Checkpoint]:
        return [Checkpoint(query.consumed, self.name)]


class BranchPoint(Placement):
    name = "branch_point"
    uses_radix = True

    def positions(self, query: Query) -> list[Checkpoint]:
        return [Checkpoint(query.branch, self.name)]


class BeforeEnd(Placement):
    """``N`` tokens before the end of the prompt."""

    def __init__(self, tokens: int) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"before_end needs a token count >= 0, got {tokens!r}")
        self.tokens = tokens
        self.name = f"before_end:{tokens}"

    def positions(self, query: Query) -> list[Checkpoint]:
        return [Checkpoint(min(query.prompt_length, query.consumed) - self.tokens, "before_end")]


class Combined(Placement):
    """The union of several placements' positions."""

    def __init__(self, parts: list[Placement]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.uses_radix = any(p.uses_radix for p in parts)

    def positions(self, query: Query) -> list[Checkpoint]:
        return [c for part in self.parts for c in part.positions(query)]


#: The placements by name (``before_end`` takes ``:N``).
PLACEMENTS = {
    "every_block": EveryBlock,
    "end_of_prompt": EndOfPrompt,
    "end_of_request": EndOfRequest,
    "branch_point": BranchPoint,
    "before_end": BeforeEnd,
}


def make_placement(placement: str | Placement) -> Placement:
    """A placement from its name (``+`` joins several; ``before_end:N``) or an instance (returned as is).

    Raises:
        ValueError: an unknown name or a bad ``N``. TypeError: neither a name nor a ``Placement``.
    """
    if isinstance(placement, Placement):
        return placement
    if not isinstance(placement, str):
        raise TypeError(f"placement must be a placement name or a Placement, got {type(placement).__name__}")
    parts = []
    for part in placement.split("+"):
        name, _, arg = part.partition(":")
        if name not in PLACEMENTS:
            raise ValueError(f"placement must name placements of {sorted(PLACEMENTS)} joined by '+', got {part!r}")
        if name == "before_end":
            if not arg.isdigit():
                raise ValueError(f"placement before_end needs a token count, as 'before_end:16', got {part!r}")
            parts.append(BeforeEnd(int(arg)))
        elif arg:
            raise ValueError(f"placement {name} takes no argument, got {part!r}")
        else:
            parts.append(PLACEMENTS[name]())
    return parts[0] if len(parts) == 1 else Combined(parts)


def plan(placement: Placement, query: Query) -> list[Checkpoint]:
    """The placement's positions in ``(start, consumed]``, each length once (first kind wins), ascending."""
    seen: dict[int, str] = {}
    for length, kind in placement.positions(query):
        if query.start < length <= query.consumed and length not in seen:
            seen[length] = kind
    return [Checkpoint(n, seen[n]) for n in sorted(seen)]
