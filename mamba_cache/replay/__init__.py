"""Replay commit: roll speculative decoding back by recomputing the accepted steps.

Instead of keeping the state after every draft step (``commit_mode="scatter"``), the verify pass keeps a small per-step
stash (the step's inputs) and the commit re-applies the accepted steps to the slot's state.
[`reference`][mamba_cache.replay.reference] is the NumPy definition (and the step functions the tiny models' NumPy
decode steps call); [`kernels`][mamba_cache.replay.kernels] holds the device building blocks (step functions,
rounding, the row / slot / tracking rules) that the models' Numba decode kernels call too;
[`tiled`][mamba_cache.replay.tiled] holds the kernels the backend launches, built from them.
"""

from .reference import conv_after, gdn_step, mamba2_step, replay_commit

__all__ = ["conv_after", "gdn_step", "mamba2_step", "replay_commit"]
