"""The live pools: the seed's state manager, its NumPy reference, its Numba backend and kernels.

- ``.manager``: the backend-neutral interface, argument checks, views and ownership;
- ``.numpy_backend``: the NumPy reference (the executable contract);
- ``.numba_backend``: the same interface on CUDA device arrays (imports Numba);
- ``.kernels``: the ``@cuda.jit`` kernels; ``.launch``: prepared kernel launches.
"""
