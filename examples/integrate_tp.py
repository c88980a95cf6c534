"""Several GPUs: one cache manager per tensor-parallel rank, each holding its own heads.

The cache has no collective of its own: each rank's verify pass writes its own heads' states and
every rank commits the same accept lengths (they come from logits every rank has after the
all-reduce). ``tests/test_integrate.py`` runs :func:`rank_caches` and :func:`commit_on_every_rank`
with NumPy managers standing in for the ranks; ``examples/tp_tiny_mamba2.py`` is the whole model
over two GPUs (NCCL), checked by ``tests/test_tp.py``.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the twin module beside this file

from integrate_engine_numpy import make_config  # noqa: E402

from mamba_cache import Config, NumpyMambaCacheManager  # noqa: E402


# --8<-- [start:shard]
def rank_config(config: Config, tp: int, rank: int) -> Config:
    """Rank ``rank``'s cache config: ``H / tp`` heads and their conv channels, ``tp_rank = rank``.

    Mamba2's B and C channels are split with the groups when ``tp`` divides ``n_groups``; with one
    group every rank needs all of them, so they are replicated (``2 * N`` channels). The rank is
    recorded in the config: moving a slot's state to another worker reads it.
    """
    replicated = 2 * config.recurrent_state_size if config.n_groups == 1 else 0
    return config.shard(tp, replicated_conv_channels=replicated, rank=rank)


def rank_caches(config: Config, tp: int, make=NumpyMambaCacheManager) -> list:
    """One manager per rank. On GPUs each process builds only its own: ``make(cfg, device=rank)``."""
    return [make(rank_config(config, tp, rank)) for rank in range(tp)]


# --8<-- [end:shard]


# --8<-- [start:commit]
def commit_on_every_rank(caches: list, accept: np.ndarray, verify_len: int) -> None:
    """The same commit on every rank: the accept lengths are replicated, so no rank talks to another."""
    for cache in caches:  # on GPUs: each process, its own cache, its own stream
        cache.reshape_intermediate_states(accept.shape[0], verify_len)
        cache.scatter_mtp_states(accept)


# --8<-- [end:commit]


def demo(tp: int = 2) -> dict:
    """Shard the integration example's cache over ``tp`` ranks and commit the same rows on each."""
    config = make_config("scatter", batch=4)
    caches = rank_caches(config, tp)
    for rank, cache in enumerate(caches):  # distinct per-step states per rank
        for layer in range(cache.num_layers()):
            cache.get_intermediate_recurrent_state(layer)[...] = rank + 1
            cache.get_intermediate_conv_state(layer)[...] = rank + 1
    commit_on_every_rank(caches, np.array([2, 1, 0], dtype=np.int32), config.max_intermediate_seq_len)
    rank_cfg = caches[0].get_config()
    return {
        "heads": [c.get_config().recurrent_state_num_heads for c in caches],
        "ranks": [c.get_config().tp_rank for c in caches],
        "conv_dim": rank_cfg.conv_dim,
        "n_groups": rank_cfg.n_groups,
        "committed": [float(c.get_recurrent_state(0)[:2].min()) for c in caches],  # rows 0, 1: step a - 1
        "padding": [float(c.get_recurrent_state(0)[2].max()) for c in caches],  # row 2 accepted 0: untouched
    }
