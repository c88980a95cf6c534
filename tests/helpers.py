"""Helpers the test files share: the backends, the session's seed, pools written and compared whole, markers.

Importing it picks the Numba target first (the GPU if there is one, else the CUDA simulator), as
``conftest.py`` does, so a test file may import it before anything imports Numba.

Markers (registered in ``pyproject.toml``):

- ``slow``: left out of ``make test`` and run by ``make test-long`` (and by CI). Put it on a case
  through `simulator_long` / `SIMULATOR_LONG` (a case that is long only because the CUDA simulator
  runs every thread in Python: on a GPU it stays in the default run), or directly on a run whose
  length is its point (the PTX / ptxas sweeps over every kernel variant). The 2000-example property
  profile is not a marker: ``make test-long`` runs the property files with ``HYPOTHESIS_PROFILE=long``.
- ``needs_gpu``: skipped without a CUDA GPU, with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

from mamba_cache import select_numba_target

ON_GPU = select_numba_target()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager  # noqa: E402

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")


#: ``marks=`` of a ``pytest.param`` case that is long only on the CUDA simulator (``slow`` there, none on a GPU).
SIMULATOR_LONG = () if ON_GPU else (pytest.mark.slow,)


def simulator_long(**params) -> pytest.MarkDecorator:
    """Mark the cases of a parametrized test whose parameters equal ``params`` as long under the simulator.

    Such a case is marked ``slow`` (``make test-long``) where Numba runs on the CUDA simulator, and
    stays in the default run on a GPU, where it takes milliseconds. Apply several to one test for
    several groups of cases; ``conftest.py`` reads them at collection.
    """
    return pytest.mark.simulator_long(**params)


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


def writable_pools(manager):
    """The manager's stacked pools for a test's set-up to write (``manager.pools`` is read-only on NumPy)."""
    return manager._pools


def write_pool(manager, pool: str, values: np.ndarray) -> None:
    """Overwrite a whole stacked pool of ``manager`` with ``values``."""
    target = getattr(writable_pools(manager), pool)
    if values.dtype != target.dtype and values.dtype.itemsize == target.dtype.itemsize:
        values = values.view(target.dtype)  # bfloat16 as uint16 raw bits (files, Numba pools)
    if isinstance(target, np.ndarray):
        target[...] = values
    else:
        target.copy_to_device(np.ascontiguousarray(values))


def fill_random(managers, rng) -> None:
    """Write the same random bits into every pool of each manager."""
    for pool in POOLS:
        target = getattr(managers[0].pools, pool)
        if target is None:
            continue
        values = random_bits(rng, target.shape, target.dtype)
        for manager in managers:
            write_pool(manager, pool, values)


def snapshot(manager) -> dict:
    """Host copies of every pool (the whole buffers, untouched slots included), 8-bit scales and residuals too."""
    if manager.pools is None:
        return {}
    pools = {pool: to_host(getattr(manager.pools, pool)) for pool in POOLS if getattr(manager.pools, pool) is not None}
    return pools | {name: to_host(pool) for name, pool in manager.scale_pools.items()}


def assert_same_bits(a: dict, b: dict, context: str = "") -> None:
    assert a.keys() == b.keys(), context
    for pool in a:
        if a[pool].tobytes() != b[pool].tobytes():
            diff = np.flatnonzero(a[pool].view(f"u{a[pool].itemsize}") != b[pool].view(f"u{b[pool].itemsize}"))
            raise AssertionError(f"{context}: pool {pool} differs at {diff.size} elements, first flat index {diff[0]}")


def store_snapshot(store) -> dict:
    """Host copies of a prefix store's device entries (``[L, P, ...]`` per kind)."""
    return {"entries_recurrent": to_host(store.entry_pools[0]), "entries_conv": to_host(store.entry_pools[1])}


def fill_store(store, rng) -> None:
    """Random, non-zero bits in every device entry of a prefix store."""
    for pool in store.entry_pools:
        values = random_bits(rng, pool.shape, pool.dtype)
        if isinstance(pool, np.ndarray):
            pool[...] = values
        else:
            pool.copy_to_device(values)


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


#: Numba vs NumPy after a replay commit or a checkpoint fold, per state dtype: FMA vs two roundings over up to V
#: (or R) steps of magnitude-1 values (a few float32 ulps), which a 16-bit store can turn into one ulp of its
#: own (bfloat16's is 2**-7, then a stochastic rounding may land on the other neighbour).
REPLAY_TOLERANCE = {
    "float16": dict(rtol=2e-3, atol=2e-3),
    "bfloat16": dict(rtol=3.2e-2, atol=3.2e-2),
    "float32": dict(rtol=1e-5, atol=1e-5),
    "float64": dict(rtol=1e-5, atol=1e-5),
}


def replay_config(mixer="mamba2", dtype="float32", **overrides) -> Config:
    """A small replay-mode config (both state kinds in ``dtype``, ``G = 2``); ``overrides`` win."""
    fields = dict(
        num_recurrent_layers=2,
        max_batch_size=5,
        recurrent_state_num_heads=4,
        recurrent_state_head_dim=3,
        recurrent_state_size=5,
        conv_dim=7,
        conv_kernel=3,
        max_intermediate_seq_len=4,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode="replay",
        mixer=mixer,
        n_groups=2,
    )
    fields.update(overrides)
    return Config(**fields)


def stash_values(config, rng, leading: tuple) -> dict:
    """Random, realistic stash (or ring) contents, ``[L, *leading, *shape]`` per field, in its dtype.

    Decays in (0.5, 1), strengths in (0, 1), unit-norm keys, the rest N(0, 1).
    """
    values = {}
    for name, (shape, dtype) in config.replay_stash_fields.items():
        full = (config.num_recurrent_layers, *leading, *shape)
        if name in ("dA", "g"):
            value = rng.uniform(0.5, 1.0, full)
        elif name == "beta":
            value = rng.uniform(0.0, 1.0, full)
        elif name == "k":
            value = rng.standard_normal(full)
            value /= np.linalg.norm(value, axis=-1, keepdims=True)
        else:
            value = rng.standard_normal(full)
        values[name] = value.astype(dtype)
    return values


def track_next_boundaries(store, history: list, block_size: int, verify: int) -> tuple:
    """Tracking arguments for a verify window: each row whose next block boundary falls inside it checkpoints there.

    ``history[b]``: the tokens row ``b`` has consumed. Returns int32 ``(entries, steps)``: a reserved
    entry and the window step after which the row has consumed a multiple of ``block_size``, or -1.
    """
    entries, steps = np.full(len(history), -1, np.int32), np.full(len(history), -1, np.int32)
    for b, tokens in enumerate(history):
        boundary = (len(tokens) // block_size + 1) * block_size
        if boundary <= len(tokens) + verify:
            entries[b], steps[b] = store.reserve(), boundary - len(tokens) - 1
    return entries, steps


def publish_tracked(store, history: list, drafts, accept, entries, steps) -> int:
    """After a tracking commit: extend ``history`` by the accepted drafts, publish the tracked entries, free the rest.

    Returns the number of entries published.
    """
    published = 0
    for b in range(len(history)):
        consumed = len(history[b])
        history[b] += list(drafts[b, : accept[b]])
        if entries[b] >= 0:
            if steps[b] < accept[b]:
                store.publish(int(entries[b]), history[b][: consumed + steps[b] + 1])
                published += 1
            else:
                store.release(int(entries[b]))
    return published


REFERENCE = pathlib.Path(__file__).resolve().parents[1] / "reference"


def golden_generator():
    """``reference/generate.py`` as a module (the golden vectors' generator)."""
    spec = importlib.util.spec_from_file_location("golden_generate", REFERENCE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
