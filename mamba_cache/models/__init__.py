"""Small recurrent models that run on the cache, so its contract can be proved end to end.

- :mod:`.mamba2`: ``TinyMamba2``, a Mamba2 stack (NumPy decode step, verify pass);
- :mod:`.mamba2_kernels`: its decode step as CUDA kernels (imports Numba).
"""
