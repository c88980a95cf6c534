"""Test set-up: the Numba target, the session's fixtures and report header, the long-on-simulator cases.

Without a GPU the Numba backend runs under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), so its
tests run everywhere and are never skipped; with a GPU they run on it. Set
``NUMBA_ENABLE_CUDASIM`` yourself to force either. The helpers the test files share are in
``helpers.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, SEED  # picks the Numba target before anything imports Numba


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


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` the cases that ``helpers.simulator_long`` names, where Numba runs on the simulator."""
    if ON_GPU:
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for mark in item.iter_markers("simulator_long"):
            unknown = set(mark.kwargs) - set(params)
            if unknown:
                raise pytest.UsageError(f"{item.nodeid}: simulator_long names parameters it does not have: {unknown}")
            if all(params[name] == value for name, value in mark.kwargs.items()):
                item.add_marker(pytest.mark.slow)
                break


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
