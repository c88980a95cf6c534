"""Prefix-state store: checkpoints of recurrent state for shared prompt prefixes.

:class:`PrefixStateCache` keeps whole-slot checkpoints at block boundaries, keyed by the block-digest
chain of :func:`block_digests`; the same host logic serves both backends.
"""

from .keys import block_digests, root_digest
from .store import PrefixHandle, PrefixStateCache, PrefixStats

__all__ = ["PrefixHandle", "PrefixStateCache", "PrefixStats", "block_digests", "root_digest"]
