"""Small recurrent models that run on the cache, so its contract can be proved end to end.

- :mod:`.mamba2`: ``TinyMamba2``, a Mamba2 stack (NumPy decode step, verify pass);
- :mod:`.mamba2_kernels`: its decode step as CUDA kernels (imports Numba);
- :mod:`.gdn`: ``TinyGatedDeltaNet``, a Gated DeltaNet stack (same interface), and
  :mod:`.gdn_kernels`, its CUDA kernels.

In ``commit_mode="replay"`` their verify passes write the replay stash; their decode steps call the
replay commit's own step functions (:mod:`mamba_cache.replay`), which makes replay == sequential
bit for bit on each backend.
"""
