"""The live pools: the seed's state manager, its NumPy reference, its Numba backend and kernels.

- :mod:`.manager`: the backend-neutral interface, argument checks, views and ownership;
- :mod:`.numpy_backend`: the NumPy reference (the executable contract);
- :mod:`.numba_backend`: the same interface on CUDA device arrays (imports Numba);
- :mod:`.kernels`: the ``@cuda.jit`` kernels; :mod:`.launch`: prepared kernel launches.
"""
