"""Prefix-state store: checkpoints of recurrent state for shared prompt prefixes.

[`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] keeps whole-slot checkpoints at block boundaries, keyed by the
block-digest chain of [`block_digests`][mamba_cache.prefix.keys.block_digests]; the same host logic serves both
backends.
"""

from .keys import block_digests, root_digest
from .store import PrefixHandle, PrefixStateCache, PrefixStats

__all__ = ["PrefixHandle", "PrefixStateCache", "PrefixStats", "block_digests", "root_digest"]
