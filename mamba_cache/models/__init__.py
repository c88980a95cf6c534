"""Small recurrent models that run on the cache, so its contract can be proved end to end.

- `mamba2`: ``TinyMamba2``, a Mamba2 stack (NumPy decode step, verify pass);
- `mamba2_kernels`: its decode step as CUDA kernels (imports Numba);
- `gdn`: ``TinyGatedDeltaNet``, a Gated DeltaNet stack (same interface), and
  `gdn_kernels`, its CUDA kernels.

In ``commit_mode="replay"`` their verify passes write the replay stash; their decode steps call the
replay commit's own step functions (`mamba_cache.replay`), which makes replay == sequential
bit for bit on each backend.
"""
