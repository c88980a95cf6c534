"""Test set-up: pick the Numba target before numba is imported, and share helpers.

Without a GPU the Numba backend runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), so its
tests run everywhere and are never skipped; with a GPU they run on it. Set
``NUMBA_ENABLE_CUDASIM`` yourself to force either.
"""

from __future__ import annotations

import os

from mamba_cache import select_numba_target

ON_GPU = select_numba_target()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402

BACKENDS = {"numpy": NumpyMambaCacheManager, "numba": NumbaMambaCacheManager}
POOLS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")


#: The seed of every ``rng`` fixture unless ``MAMBA_CACHE_SEED`` says otherwise (a fixed seed: a CI
#: run is reproducible, and fails again on a rerun when it should).
DEFAULT_SEED = 20261128


def session_seed(value: str | None) -> int:
    """The seed for ``MAMBA_CACHE_SEED=value``: unset -> DEFAULT_SEED, "random" -> a fresh one, else the int."""
    if value is None or not value.strip():
        return DEFAULT_SEED
    if value.strip().lower() == "random":
        return int(np.random.SeedSequence().entropy % 2**32)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"MAMBA_CACHE_SEED must be an integer or 'random', got {value!r}") from None


SEED = session_seed(os.environ.get("MAMBA_CACHE_SEED"))


def _load_hypothesis_profile() -> None:
    """The property tests' profiles (tests/test_properties.py, tests/test_prefix_properties.py).

    CI (default): a fixed set of examples, the same every run (derandomize), so a red run is red
    again on a rerun. ``HYPOTHESIS_PROFILE=long`` fuzzes: fresh random examples each run, failures
    kept in the database. Loaded here so a property test file run on its own gets the same profile.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # only the property test files need it (and fail on their own import)
        return
    slow = [HealthCheck.too_slow]
    settings.register_profile("default", max_examples=25, deadline=None, derandomize=True, suppress_health_check=slow)
    settings.register_profile("long", max_examples=2000, deadline=None, derandomize=False, suppress_health_check=slow)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


_load_hypothesis_profile()


def pytest_report_header(config):
    return [
        f"mamba_cache numba target: {'GPU' if ON_GPU else 'CUDA simulator'}",
        f"MAMBA_CACHE_SEED={SEED} (replay with MAMBA_CACHE_SEED={SEED}; MAMBA_CACHE_SEED=random draws a fresh one)",
    ]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request):
    """The name of each backend in turn."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded with the session's seed (fixed unless ``MAMBA_CACHE_SEED`` says otherwise).

    The seed is in the report header and printed with a failing test's output.
    """
    print(f"MAMBA_CACHE_SEED={SEED}")
    return np.random.default_rng(SEED)


def small_config(**overrides) -> Config:
    fields = dict(
        num_recurrent_layers=3,
        max_batch_size=5,
        recurrent_state_num_heads=2,
        recurrent_state_head_dim=3,
        recurrent_state_size=5,
        conv_dim=7,
        conv_kernel=3,
        max_intermediate_seq_len=4,
        recurrent_state_dtype="float32",
        conv_state_dtype="float16",
    )
    fields.update(overrides)
    return Config(**fields)


def to_host(array) -> np.ndarray:
    """A host copy of a NumPy or Numba array."""
    if isinstance(array, np.ndarray):
        return array.copy()
    return array.copy_to_host()


def random_bits(rng, shape, dtype) -> np.ndarray:
    """Random, non-zero bit patterns of ``dtype`` (NaN payloads included: copies must keep them)."""
    dtype = np.dtype(dtype)
    words = rng.integers(1, 2 ** (8 * dtype.itemsize), size=shape, dtype=np.uint64 if dtype.itemsize == 8 else np.int64)
    return words.astype(f"u{dtype.itemsize}").view(dtype)


def write_pool(manager, pool: str, values: np.ndarray) -> None:
    """Overwrite a whole stacked pool of ``manager`` with ``values``."""
    target = getattr(manager._pools, pool)
    if values.dtype != target.dtype and values.dtype.itemsize == target.dtype.itemsize:
        values = values.view(target.dtype)  # bfloat16 as uint16 raw bits (files, Numba pools)
    if isinstance(target, np.ndarray):
        target[...] = values
    else:
        target.copy_to_device(np.ascontiguousarray(values))


def fill_random(managers, rng) -> None:
    """Write the same random bits into every pool of each manager."""
    for pool in POOLS:
        target = getattr(managers[0]._pools, pool)
        if target is None:
            continue
        values = random_bits(rng, target.shape, target.dtype)
        for manager in managers:
            write_pool(manager, pool, values)


def snapshot(manager) -> dict:
    """Host copies of every pool (the whole buffers, untouched slots included)."""
    if manager._pools is None:
        return {}
    return {pool: to_host(getattr(manager._pools, pool)) for pool in POOLS if getattr(manager._pools, pool) is not None}


def assert_same_bits(a: dict, b: dict, context: str = "") -> None:
    assert a.keys() == b.keys(), context
    for pool in a:
        if a[pool].tobytes() != b[pool].tobytes():
            diff = np.flatnonzero(a[pool].view(f"u{a[pool].itemsize}") != b[pool].view(f"u{b[pool].itemsize}"))
            raise AssertionError(f"{context}: pool {pool} differs at {diff.size} elements, first flat index {diff[0]}")


def device_int32(backend: str, values) -> object:
    """``values`` as an int32 array the backend's scatter takes (on the device for Numba)."""
    host = np.asarray(values, dtype=np.int32)
    if backend == "numpy":
        return host
    from numba import cuda

    return cuda.to_device(host)


def sync() -> None:
    from numba import cuda

    cuda.synchronize()
