"""Checkpointed decoding (``Config.commit_mode="checkpoint"``): a checkpoint and a history ring per slot.

The main pools hold each slot's checkpoint, the state after ``p0`` tokens; a ring of ``R``
(``Config.history_len``) steps holds the replay stash of the ``h`` steps accepted past it (and the
verify window's steps after them). A commit only counts the accepted steps; when the ring could
not hold another verify window it folds them into the checkpoint with the replay commit's
arithmetic. [`mamba_cache.checkpoint.reference`][mamba_cache.checkpoint.reference] is the NumPy
reference of reading and folding the ring.
"""

from .reference import fold, history_views, state_after

__all__ = ["fold", "history_views", "state_after"]
