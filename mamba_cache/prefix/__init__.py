"""Prefix-state store: checkpoints of recurrent state for shared prompt prefixes.

[`PrefixStateCache`][mamba_cache.prefix.PrefixStateCache] keeps whole-slot checkpoints after any prefix length, keyed by
the block-digest chain of [`block_digests`][mamba_cache.prefix.keys.block_digests] (and a tail digest off the block
grid, [`tail_digest`][mamba_cache.prefix.keys.tail_digest]); where to checkpoint is a placement
(`mamba_cache.prefix.placement`), what to keep a policy (`mamba_cache.prefix.policy`). The same host logic serves both
backends.
"""

from .keys import block_digests, prefix_key, root_digest, tail_digest
from .placement import Checkpoint, make_placement
from .policy import make_policy
from .stats import BlockSizeWarning, PrefixStats
from .store import PrefixHandle, PrefixStateCache

__all__ = [
    "BlockSizeWarning",
    "Checkpoint",
    "PrefixHandle",
    "PrefixStateCache",
    "PrefixStats",
    "block_digests",
    "make_placement",
    "make_policy",
    "prefix_key",
    "root_digest",
    "tail_digest",
]
