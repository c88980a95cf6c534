"""Precision: bfloat16 pools, converting commits (every dtype pair, both rounding modes), Philox."""

import itertools

import numpy as np
import pytest
from helpers import BACKENDS, ON_GPU, device_int32, fill_random, small_config, snapshot, to_host, write_pool
from numba import cuda

from mamba_cache import Config, ConfigError, NumpyMambaCacheManager
from mamba_cache.precision import bfloat16, convert, dtype_format, kernels, philox4x32_10, rounding_bits

DTYPES = ("float16", "bfloat16", "float32", "float64")
PAIRS = [(s, d) for s, d in itertools.product(DTYPES, DTYPES) if s != d]

# Random123's published known-answer vectors for Philox4x32-10 (kat_vectors: counter, key, result).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def as_dtype(name):
    return bfloat16 if name == "bfloat16" else np.dtype(name)


def sample_values(rng, dtype, count=512):
    """Random bit patterns (all exponents, NaNs, infinities) and values near 1 and near the subnormals."""
    dtype = as_dtype(dtype)
    size = dtype.itemsize
    bits = rng.integers(0, 2 ** (8 * size), size=count, dtype=np.uint64 if size == 8 else np.int64).astype(f"u{size}")
    raw = bits.view(dtype)
    near_one = rng.uniform(-4, 4, count).astype(np.float64)
    tiny = rng.uniform(-1, 1, count) * np.float64(2.0**-20)
    with np.errstate(all="ignore"):
        extra = np.concatenate([near_one, tiny, [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 3e38, 1e-45]])
        return np.concatenate([raw, extra.astype(dtype)])


def isnan(array):
    with np.errstate(all="ignore"):
        return np.isnan(np.asarray(array).astype(np.float64))


def bits_of(array):
    return np.asarray(array).view(f"u{np.asarray(array).dtype.itemsize}")


# ---------------------------------------------------------------- the reference


def test_philox_matches_random123_known_answers():
    counters = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint64)
    keys = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint64)
    assert philox4x32_10(counters, keys).tolist() == [list(r) for _, _, r in PHILOX_KAT]


# NumPy / ml_dtypes casts are correctly rounded for these pairs (f64 -> bfloat16 goes through
# float32 in ml_dtypes, a double rounding, so it is checked against an exact construction below).
@pytest.mark.parametrize("src,dst", [p for p in PAIRS if p != ("float64", "bfloat16")], ids=str)
def test_nearest_even_matches_numpy_casts(rng, src, dst):
    values = sample_values(rng, src, 4096)
    with np.errstate(all="ignore"):
        expected = values.astype(as_dtype(dst))
    got = convert(values, as_dtype(dst))
    nan = isnan(expected)
    assert isnan(got[nan]).all()
    assert (bits_of(got)[~nan] == bits_of(expected)[~nan]).all()


def test_float64_to_bfloat16_rounds_once():
    # 1 + 2**-8 + 2**-30: float32 rounding first gives the tie 1 + 2**-8, which rounds to even (1.0);
    # rounding once sees it is above the tie and rounds up.
    value = np.array([1 + 2.0**-8 + 2.0**-30, -(1 + 2.0**-8 + 2.0**-30), 1 + 2.0**-8])
    got = convert(value, bfloat16).astype(np.float64)
    assert got.tolist() == [1 + 2.0**-7, -(1 + 2.0**-7), 1.0]


def test_stochastic_rounding_is_unbiased_and_brackets_the_value():
    value = np.float32(1 + 2.0**-10 + 2.0**-12)  # between two bfloat16 neighbours 1 and 1 + 2**-7
    n = 20000
    got = convert(np.full((n, 1), value), bfloat16, stochastic=True, seed=7, layer=0, position=np.arange(n)).astype(
        np.float64
    )
    assert set(np.unique(got)) == {1.0, 1 + 2.0**-7}
    p = (2.0**-10 + 2.0**-12) / 2.0**-7  # probability of rounding up
    assert abs((got == 1 + 2.0**-7).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_rounding_bits_depend_on_every_key_field_and_nothing_else():
    base = rounding_bits(1, 2, 0, 5, 9)
    assert (rounding_bits(1, 2, 0, 5, 9) == base).all()
    for other in (rounding_bits(2, 2, 0, 5, 9), rounding_bits(1, 3, 0, 5, 9), rounding_bits(1, 2, 1, 5, 9)):
        assert (other != base).any()
    assert (rounding_bits(1, 2, 0, 6, 9) != base).any()
    assert (rounding_bits(1, 2, 0, 5, 16)[:9] == base).all()  # element e's bits do not depend on the slot size


# ---------------------------------------------------------------- device functions vs reference


def run_convert_kernel(values, dst, mode, seed=0, layer=0, kind=0, positions=None):
    values = np.atleast_2d(values)
    rows, elems = values.shape
    src_bits = np.ascontiguousarray(bits_of(values)).reshape(1, rows, elems)
    out = cuda.device_array((1, rows, elems), dtype=f"u{as_dtype(dst).itemsize}")
    formats = np.array([mode, *dtype_format(values.dtype), *dtype_format(as_dtype(dst))], dtype=np.int32)
    positions = np.zeros(rows, np.int32) if positions is None else np.asarray(positions, np.int32)
    (chunks,), threads = kernels.launch_shape(elems)
    kernels.convert_array[(chunks, rows, 1), threads](
        out, cuda.to_device(src_bits), cuda.to_device(formats), layer, kind, cuda.to_device(positions),
        seed & 0xFFFFFFFF, seed >> 32,
    )  # fmt: skip
    return out.copy_to_host().reshape(rows, elems)


@cuda.jit
def philox_kernel(counters, keys, out):
    i = cuda.threadIdx.x
    if i < out.shape[0]:
        c = counters
        r = kernels.philox4x32_10(c[i, 0], c[i, 1], c[i, 2], c[i, 3], keys[i, 0], keys[i, 1])
        for j in range(4):
            out[i, j] = r[j]


def test_device_philox_matches_random123_known_answers():
    counters = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint64)
    keys = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint64)
    out = cuda.to_device(np.zeros((3, 4), dtype=np.uint64))
    philox_kernel[1, 32](cuda.to_device(counters), cuda.to_device(keys), out)
    assert out.copy_to_host().tolist() == [list(r) for _, _, r in PHILOX_KAT]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("src,dst", PAIRS, ids=str)
def test_device_conversion_matches_reference_bit_for_bit(rng, src, dst, stochastic):
    values = sample_values(rng, src, 40)
    rows = 2
    elems = values.size // rows  # 24 + 9 specials: off a group-of-4 edge
    values = values[: rows * elems].reshape(rows, elems)
    positions = rng.integers(0, 2**31 - 1, rows).astype(np.int32)
    mode = 2 if stochastic else 1
    sr = stochastic and as_dtype(dst).itemsize == 2 and as_dtype(src).itemsize >= 4
    got = run_convert_kernel(values, dst, mode if (sr or not stochastic) else 1, 99, 3, 1, positions)
    expected = convert(values, as_dtype(dst), stochastic=sr, seed=99, kind=1, layer=3, position=positions)
    assert got.tobytes() == bits_of(expected).tobytes()


# ---------------------------------------------------------------- the manager's converting commits


def make_pair(config):
    return [BACKENDS[name](config) for name in ("numpy", "numba")]


def fill_bits(managers, rng):
    """The same random finite values (within float16 range, so every conversion is interesting)."""
    for pool in ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv"):
        target = managers[0].pools[("recurrent", "conv", "intermediate_recurrent", "intermediate_conv").index(pool)]
        values = rng.uniform(-100, 100, target.shape).astype(target.dtype)
        for manager in managers:
            write_pool(manager, pool, values)


def host_pools(manager):
    return {k: bits_of(v) for k, v in snapshot(manager).items()}


def assert_pools_equal(a, b, context=""):
    assert a.keys() == b.keys()
    for pool in a:
        assert a[pool].tobytes() == b[pool].tobytes(), f"{context}: {pool}"


@pytest.mark.parametrize("conv_dim", [7, 8], ids=["conv-21-elements", "conv-24-elements"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("main,inter", PAIRS, ids=str)
def test_converting_scatter_numba_matches_numpy(rng, main, inter, stochastic, conv_dim):
    # conv slot of 7 * 3 = 21 elements (off a group edge: the element path) or 8 * 3 = 24 (the
    # uint64-word path), recurrent 2 * 3 * 4 = 24 (the word path)
    config = small_config(
        conv_dim=conv_dim,
        recurrent_state_size=4,
        recurrent_state_dtype=main,
        conv_state_dtype=inter,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=main,
        stochastic_rounding=stochastic,
        rounding_seed=2**40 + 5,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    before = host_pools(managers[0])
    accept = [2, 0, 4, 1]  # row 2: 4 > V - 1, a full accept: untouched
    indices = [3, 1, 0, 4]
    positions = [10, 20, 30, 2**31 - 3]
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(4, 4)
        manager.scatter_mtp_states(
            device_int32(backend, accept),
            state_indices=device_int32(backend, indices),
            positions=device_int32(backend, positions),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], f"{main} <- {inter}")
    # untouched slots (and the intermediate pools) keep their bits; touched ones hold the conversion
    reference = managers[0]
    for kind, pool in enumerate(("recurrent", "conv")):
        untouched = [s for s in range(config.max_batch_size) if s not in (3, 4)]
        assert after[0][pool][:, untouched].tobytes() == before[pool][:, untouched].tobytes()
        inter_pool = getattr(reference.pools, f"intermediate_{pool}")
        dst_dtype = getattr(reference.pools, pool).dtype
        steps = inter_pool.reshape(config.num_recurrent_layers, config.max_batch_size * 4, -1)
        for row, slot in ((0, 3), (3, 4)):
            expected = convert(
                steps[:, row * 4 + accept[row] - 1],
                dst_dtype,
                stochastic=stochastic,
                seed=config.rounding_seed,
                kind=kind,
                layer=np.arange(config.num_recurrent_layers),
                position=positions[row] + accept[row],
            )
            got = after[0][pool][:, slot].reshape(config.num_recurrent_layers, -1)
            assert got.tobytes() == bits_of(expected).tobytes(), (pool, row)
    for pool in ("intermediate_recurrent", "intermediate_conv"):
        assert after[0][pool].tobytes() == before[pool].tobytes()


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_converting_tree_commit_numba_matches_numpy(rng, stochastic):
    config = small_config(
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float16",
        intermediate_conv_state_dtype="float64",
        stochastic_rounding=stochastic,
        rounding_seed=3,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    nodes = [[0, 2, 3], [1, -1, -1], [3, 0, 9], [-1, -1, -1]]
    accept = [3, 1, 2, 3]
    positions = [5, 6, 7, 8]
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(4, 4)
        manager.scatter_accepted_tree_states(
            device_int32(backend, nodes), device_int32(backend, accept), positions=device_int32(backend, positions)
        )
    assert_pools_equal(host_pools(managers[0]), host_pools(managers[1]), "tree")


def test_stochastic_state_is_the_same_wherever_it_was_computed(rng):
    # The same float32 state committed from another row, slot and draft step, at the same token
    # position, gets the same bits; another position gets other bits.
    config = small_config(
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float16",
        intermediate_conv_state_dtype="float32",
        stochastic_rounding=True,
        rounding_seed=11,
    )
    for backend in ("numpy", "numba"):
        manager = BACKENDS[backend](config)
        manager.reshape_intermediate_states(3, 4)
        for pool in ("intermediate_recurrent", "intermediate_conv"):
            flat = to_host(getattr(manager.pools, pool))
            layer_steps = flat.reshape(flat.shape[0], 5 * 4, -1)
            state = rng.uniform(-1, 1, (flat.shape[0], layer_steps.shape[2])).astype(np.float32)
            layer_steps[:, 0 * 4 + 2] = state  # row 0, step 2: consumed 10 + 3 tokens
            layer_steps[:, 1 * 4 + 0] = state  # row 1, step 0: consumed 12 + 1 tokens
            layer_steps[:, 2 * 4 + 0] = state  # row 2, step 0: consumed 13 + 1 tokens
            write_pool(manager, pool, flat)
        manager.scatter_mtp_states(
            device_int32(backend, [3, 1, 1]),
            state_indices=device_int32(backend, [4, 0, 2]),
            positions=device_int32(backend, [10, 12, 13]),
        )
        for pool in ("recurrent", "conv"):
            got = bits_of(to_host(getattr(manager.pools, pool)))
            assert got[:, 4].tobytes() == got[:, 0].tobytes(), (backend, pool)
            assert got[:, 4].tobytes() != got[:, 2].tobytes(), (backend, pool)


def test_stochastic_commit_requires_positions_and_changes_nothing(backend, rng):
    config = small_config(
        recurrent_state_dtype="float16", intermediate_recurrent_state_dtype="float32", stochastic_rounding=True
    )
    manager = BACKENDS[backend](config)
    fill_bits([manager], rng)
    before = host_pools(manager)
    with pytest.raises(ValueError, match="positions .* is required"):
        manager.scatter_mtp_states(device_int32(backend, [1, 2]))
    with pytest.raises(ValueError, match="positions must have the length of accept_lengths"):
        manager.scatter_mtp_states(device_int32(backend, [1, 2]), positions=device_int32(backend, [1]))
    assert_pools_equal(before, host_pools(manager))


# ---------------------------------------------------------------- bfloat16 pools


@pytest.mark.parametrize("spelling", ["bfloat16", bfloat16, "ml_dtypes"], ids=["str", "dtype", "type"])
def test_bfloat16_config_spellings(spelling):
    import ml_dtypes

    value = ml_dtypes.bfloat16 if spelling == "ml_dtypes" else spelling
    config = small_config(recurrent_state_dtype=value, conv_state_dtype=value)
    assert config.recurrent_state_dtype == bfloat16 and config.conv_state_dtype.name == "bfloat16"
    assert config.pool_bytes()["recurrent"] == 3 * 5 * 2 * 3 * 5 * 2


@pytest.mark.parametrize("field", ["recurrent_state_dtype", "intermediate_conv_state_dtype"])
def test_bad_dtype_lists_the_allowed_ones(field):
    allowed = "float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2, int8"
    with pytest.raises(ConfigError, match=rf"{field} must be one of {allowed}, got int16"):
        small_config(**{field: "int16"})


def test_bfloat16_pools_per_backend_and_scatter_parity(rng):
    config = small_config(recurrent_state_dtype="bfloat16", conv_state_dtype="bfloat16")
    numpy_cache, numba_cache = make_pair(config)
    assert numpy_cache.get_recurrent_state(0).dtype == bfloat16
    assert numba_cache.get_recurrent_state(0).dtype == np.uint16  # raw bits: Numba has no bfloat16
    assert numba_cache.get_intermediate_conv_state(1).dtype == np.uint16
    fill_bits([numpy_cache, numba_cache], rng)
    before = host_pools(numpy_cache)
    numpy_cache.scatter_mtp_states(np.array([2, 0, 3], np.int32))
    numba_cache.scatter_mtp_states(device_int32("numba", [2, 0, 3]))
    after = host_pools(numpy_cache)
    assert_pools_equal(after, host_pools(numba_cache), "bf16")
    assert after["recurrent"][:, 1].tobytes() == before["recurrent"][:, 1].tobytes()
    assert after["recurrent"][:, 0].tobytes() != before["recurrent"][:, 0].tobytes()


def test_bfloat16_snapshot_round_trips_across_backends(rng, tmp_path):
    config = small_config(recurrent_state_dtype="bfloat16", conv_state_dtype="float32")
    numpy_cache, numba_cache = make_pair(config)
    fill_bits([numpy_cache, numba_cache], rng)
    numba_cache.save_slot(tmp_path / "s.npz", 2)
    numpy_cache.clear_states()
    numpy_cache.load_slot(tmp_path / "s.npz", 0)
    assert (
        bits_of(numpy_cache.get_recurrent_state(0)[0]).tobytes()
        == bits_of(to_host(numba_cache.get_recurrent_state(0))[2]).tobytes()
    )
    other = NumpyMambaCacheManager(small_config(recurrent_state_dtype="float16", conv_state_dtype="float32"))
    from mamba_cache.snapshot import SnapshotError

    with pytest.raises(SnapshotError, match="recurrent_state_dtype is 'bfloat16' there, 'float16' here"):
        other.load_slot(tmp_path / "s.npz", 0)


def test_mixed_dtypes_are_built_and_sized(backend):
    config = Config(
        num_recurrent_layers=1,
        max_batch_size=2,
        recurrent_state_num_heads=1,
        recurrent_state_head_dim=2,
        recurrent_state_size=2,
        conv_dim=2,
        conv_kernel=2,
        max_intermediate_seq_len=3,
        recurrent_state_dtype="float32",
        intermediate_recurrent_state_dtype="bfloat16",
    )
    cache = BACKENDS[backend](config)
    assert config.pool_bytes()["intermediate_recurrent"] == 2 * 3 * 4 * 2
    assert cache.get_intermediate_recurrent_state(0).dtype.itemsize == 2


def test_cli_plan_takes_state_dtypes(capsys):
    from mamba_cache.cli import main

    args = ["plan", "--preset", "mamba2-130m", "--mtp", "2", "--dtype", "bfloat16", "--conv-dtype", "float32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "intermediate_recurrent  [8, 2, 24, 64, 128]  bfloat16" in out
    assert "conv                    [8, 1792, 4]         float32" in out
    assert main(["plan", "--preset", "mamba2-130m", "--recurrent-dtype", "int16"]) == 2
    assert "must be one of float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2, int8, got int16" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------- the tiny model with 16-bit and rounded states


def model_config(dtype, stochastic, inter=None):
    heads, dim, state = 2, 4, 4
    return Config(
        num_recurrent_layers=2,
        max_batch_size=3,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=state,
        conv_dim=heads * dim + 2 * state,
        conv_kernel=3,
        max_intermediate_seq_len=3,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=77,
    )


def speculative_and_sequential(backend, config, rng, rounds=2):
    from mamba_cache.models.mamba2 import TinyMamba2

    model = TinyMamba2(config, vocab_size=16, seed=5)
    spec, seq = BACKENDS[backend](config), BACKENDS[backend](config)
    active, verify = config.max_batch_size, config.max_intermediate_seq_len
    prompt = rng.integers(0, 16, size=(active, 2))
    model.prefill(spec, prompt)
    model.prefill(seq, prompt)
    consumed = np.full(active, 2, np.int32)
    for _ in range(rounds):
        drafts = rng.integers(0, 16, size=(active, verify))
        accept = rng.integers(1, verify + 1, size=active).astype(np.int32)
        model.verify(spec, drafts, positions=consumed)
        spec.scatter_mtp_states(device_int32(backend, accept), positions=device_int32(backend, consumed))
        model.decode_accepted(seq, drafts, accept, positions=consumed)
        consumed = consumed + accept
    return spec, seq


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_model_speculative_equals_sequential_with_16_bit_states(backend, rng, dtype, stochastic):
    spec, seq = speculative_and_sequential(backend, model_config(dtype, stochastic), rng)
    a, b = host_pools(spec), host_pools(seq)
    for pool in ("recurrent", "conv"):
        assert a[pool].tobytes() == b[pool].tobytes(), pool


def test_tiny_model_stochastic_states_are_reproducible_and_differ_from_nearest(backend):
    pools = {}
    for name, stochastic in (("sr", True), ("sr again", True), ("nearest", False)):
        spec, _ = speculative_and_sequential(backend, model_config("bfloat16", stochastic), np.random.default_rng(0))
        pools[name] = host_pools(spec)["recurrent"]
    assert pools["sr"].tobytes() == pools["sr again"].tobytes()
    assert pools["sr"].tobytes() != pools["nearest"].tobytes()


def test_tiny_model_backends_agree_with_bfloat16_stochastic_states(rng):
    config = model_config("bfloat16", True)
    seed = int(rng.integers(1 << 30))
    results = [host_pools(speculative_and_sequential(b, config, np.random.default_rng(seed))[0]) for b in BACKENDS]
    for pool in ("recurrent", "conv"):
        a, b = (r[pool].view(bfloat16).astype(np.float64) for r in results)
        # one bfloat16 ulp where float32 arithmetic differs by an ulp and flips a rounding
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_tiny_model_requires_positions_with_stochastic_rounding():
    from mamba_cache.models.mamba2 import TinyMamba2

    config = model_config("float16", True)
    with pytest.raises(ValueError, match="positions is required"):
        TinyMamba2(config).decode_step(NumpyMambaCacheManager(config), [1, 2, 3])


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_device_float32_bfloat16_fast_path_matches_reference(rng, stochastic):
    # the kernels' float32 <-> bfloat16 shortcut against the general reference: ties, near-ties,
    # overflow, subnormals, NaN payloads, random patterns
    base = rng.integers(0, 2**16, 512, dtype=np.int64).astype(np.uint32) << np.uint32(16)
    offsets = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    patterns = (base[:, None] | offsets[None, :]).ravel()
    extra = rng.integers(0, 2**32, 256, dtype=np.int64).astype(np.uint32)
    specials = np.array(
        [0x7F7FFFFF, 0x7F7F8000, 0xFF7F8001, 0x7F800001, 0xFFC00001, 0x00000001, 0x807FFFFF, 0], np.uint32
    )
    values = np.concatenate([patterns, extra, specials]).view(np.float32).reshape(2, -1)
    positions = np.array([3, 2**31 - 1], np.int32)
    narrow = run_convert_kernel(values, "bfloat16", 2 if stochastic else 1, 5, 1, 0, positions)
    expected = convert(values, bfloat16, stochastic=stochastic, seed=5, kind=0, layer=1, position=positions)
    assert narrow.tobytes() == bits_of(expected).tobytes()
    wide = run_convert_kernel(np.ascontiguousarray(narrow).view(bfloat16), "float32", 1)
    assert wide.tobytes() == bits_of(convert(expected, np.float32)).tobytes()


@pytest.mark.parametrize("elems", [2048, 2049], ids=["on-chunk-edge", "off-chunk-edge"])
def test_converting_scatter_across_chunk_edges(rng, elems):
    # a slot of 2048 elements fills exactly one chunk of 256 threads x 2 groups of 4; 2049 needs a second
    config = Config(
        num_recurrent_layers=1,
        max_batch_size=3,
        recurrent_state_num_heads=1,
        recurrent_state_head_dim=1,
        recurrent_state_size=elems,
        conv_dim=elems - 1,
        conv_kernel=1,
        max_intermediate_seq_len=2,
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float16",
        intermediate_conv_state_dtype="float64",
        stochastic_rounding=True,
        rounding_seed=9,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    before = host_pools(managers[0])
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(2, 2)
        manager.scatter_mtp_states(
            device_int32(backend, [1, 0]),
            state_indices=device_int32(backend, [2, 0]),
            positions=device_int32(backend, [40, 41]),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], f"{elems}")
    assert after[0]["recurrent"][:, :2].tobytes() == before["recurrent"][:, :2].tobytes()
    assert after[0]["recurrent"][:, 2].tobytes() != before["recurrent"][:, 2].tobytes()


# ---------------------------------------------------------------- the word path: hard values, chunk edges, tracking


def hard_values(rng, dtype, size):
    """``size`` values of ``dtype``: random patterns, specials, near-ties of every narrower format, subnormals."""
    dtype = as_dtype(dtype)
    pool = [sample_values(rng, dtype, 128)]
    if dtype == np.float32:  # NaNs whose bit pattern plus a few random bits wraps past 2**32
        pool.append(np.array([0xFFFFFFFF, 0xFFFFE001, 0xFFFFF000, 0x7FFFFFFF], np.uint32).view(dtype))
    if dtype.itemsize >= 4:  # exact ties and their neighbours for bfloat16 (16 dropped bits) and float16 (13)
        word = np.dtype(f"u{dtype.itemsize}")
        high = rng.integers(0, 2**31, 64, dtype=np.int64).astype(word) << word.type(8 * dtype.itemsize - 31)
        for drop in (16, 13, 29, 42):
            if drop < 8 * dtype.itemsize - 8:
                tie = word.type(1) << word.type(drop - 1)
                for delta in (0, 1, -1):
                    low = word.type(int(tie) + delta)
                    pool.append(((high & ~((tie << word.type(1)) - word.type(1))) | low).view(dtype))
        with np.errstate(all="ignore"):  # float16 subnormal and overflow ranges
            extra = np.concatenate([rng.uniform(-1, 1, 64) * 2.0**-14, rng.uniform(-1, 1, 64) * 2.0**-24, [65519.0]])
            pool.append(extra.astype(dtype))
    values = np.concatenate(pool)
    return values[rng.permutation(np.resize(np.arange(values.size), size))]


def write_same(managers, pool, values):
    for manager in managers:
        write_pool(manager, pool, values)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("main,inter", PAIRS, ids=str)
def test_word_path_converts_hard_values_bit_for_bit(rng, main, inter, stochastic):
    # both kinds on the uint64-word path (24-element slots); the per-step pools hold NaNs,
    # infinities, ties, subnormals and overflows; every row commits
    config = small_config(
        recurrent_state_size=4,
        conv_dim=8,
        recurrent_state_dtype=main,
        conv_state_dtype=main,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=2**63 + 17,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    for pool in ("intermediate_recurrent", "intermediate_conv"):
        shape = getattr(managers[0].pools, pool).shape
        write_same(managers, pool, hard_values(rng, inter, int(np.prod(shape))).reshape(shape))
    before = host_pools(managers[0])
    accept, indices, positions = [1, 2, 3, 3, 1], [4, 3, 2, 1, 0], [0, 7, 2**31 - 2, 100, 65535]
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(5, 4)
        manager.scatter_mtp_states(
            device_int32(backend, accept),
            state_indices=device_int32(backend, indices),
            positions=device_int32(backend, positions),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], f"{main} <- {inter}")
    for pool in ("recurrent", "conv"):  # every slot was committed: none kept its old bits
        assert (after[0][pool] != before[pool]).any()


@pytest.mark.parametrize("elems", [4096, 4100], ids=["on-chunk-edge", "off-chunk-edge"])
def test_word_path_across_chunk_edges(rng, elems):
    # word path: a float32 -> bfloat16 slot of 4096 elements fills one chunk (256 threads x 4
    # groups of 4), a bfloat16 -> float32 slot of 8192 one chunk (256 x 8 groups); +4 / +8 need
    # a second chunk, whose threads mostly idle
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=3,
        recurrent_state_num_heads=1,
        recurrent_state_head_dim=1,
        recurrent_state_size=elems,
        conv_dim=2 * elems,
        conv_kernel=1,
        max_intermediate_seq_len=2,
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float32",
        intermediate_conv_state_dtype="bfloat16",
        stochastic_rounding=True,
        rounding_seed=9,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    before = host_pools(managers[0])
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(2, 2)
        manager.scatter_mtp_states(
            device_int32(backend, [1, 0]),
            state_indices=device_int32(backend, [2, 0]),
            positions=device_int32(backend, [40, 41]),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], f"{elems}")
    for pool in ("recurrent", "conv"):
        got, old = after[0][pool].reshape(2, 3, -1), before[pool].reshape(2, 3, -1)
        assert got[:, :2].tobytes() == old[:, :2].tobytes()
        assert (got[:, 2, -4:] != old[:, 2, -4:]).all()  # the last group (in the last chunk) was written


@pytest.mark.parametrize(
    "main,inter,conv_dim,stochastic",
    [
        ("bfloat16", "float32", 8, True),
        ("bfloat16", "float32", 8, False),
        ("float32", "bfloat16", 8, False),
        ("float16", "float64", 7, True),
    ],
    ids=["bf16<-f32-stochastic", "bf16<-f32-nearest", "f32<-bf16", "f16<-f64-element-path"],
)
def test_tracking_with_mixed_dtypes_converts_into_the_store(rng, main, inter, conv_dim, stochastic):
    from mamba_cache.prefix import PrefixStateCache

    config = small_config(
        recurrent_state_size=4,
        conv_dim=conv_dim,
        recurrent_state_dtype=main,
        conv_state_dtype=main,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=77,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    stores = [PrefixStateCache(m, entries=6, block_size=4) for m in managers]
    store_bits = [rng.uniform(-1, 1, pool.shape).astype(pool.dtype) for pool in stores[0].entry_pools]
    for store in stores:
        for pool, values in zip(store.entry_pools, store_bits, strict=True):
            host = np.ascontiguousarray(values).view(pool.dtype)
            if isinstance(pool, np.ndarray):
                pool[...] = host
            else:
                pool.copy_to_device(host)
    entries = [[s.reserve() for _ in range(4)] for s in stores]
    assert entries[0] == entries[1]
    accept, steps, positions = [3, 2, 0, 2], [1, 2, 0, 0], [10, 20, 30, 2**31 - 5]
    track = entries[0]
    before = host_pools(managers[0])
    for manager, store, backend in zip(managers, stores, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(4, 3)
        if stochastic:  # the tracked copy rounds too: positions are required
            with pytest.raises(ValueError, match="positions"):
                manager.scatter_mtp_states(
                    device_int32(backend, accept),
                    store=store,
                    track_entries=device_int32(backend, track),
                    track_steps=device_int32(backend, steps),
                )
        manager.scatter_mtp_states(
            device_int32(backend, accept),
            positions=device_int32(backend, positions),
            store=store,
            track_entries=device_int32(backend, track),
            track_steps=device_int32(backend, steps),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], "commit")
    got = [[bits_of(to_host(p)) for p in s.entry_pools] for s in stores]
    for kind in range(2):
        assert got[0][kind].tobytes() == got[1][kind].tobytes(), f"store kind {kind}"
    # the definition: entry e holds convert(step t of row b) at position p + t + 1; others untouched
    layers = config.num_recurrent_layers
    tracked = {0: 1, 3: 0}  # rows whose step is accepted: row -> step (row 1: step 2 not < 2; row 2: padding)
    for kind, pool in enumerate(("recurrent", "conv")):
        steps_view = before[f"intermediate_{pool}"].reshape(layers, config.max_batch_size * 4, -1)
        steps_view = steps_view[:, : 4 * 3].view(as_dtype(inter))
        for row in range(4):
            entry_bits = got[0][kind][:, track[row]].reshape(layers, -1)
            if row in tracked:
                t = tracked[row]
                want = convert(
                    steps_view[:, row * 3 + t],
                    as_dtype(main),
                    stochastic=stochastic,
                    seed=77,
                    kind=kind,
                    layer=np.arange(layers),
                    position=positions[row] + t + 1,
                )
                assert entry_bits.tobytes() == bits_of(want).tobytes(), (pool, row)
            else:
                assert entry_bits.tobytes() == bits_of(store_bits[kind][:, track[row]]).tobytes(), (pool, row)


def test_hoisted_philox_matches_the_reference(rng):
    # philox_setup once per thread + philox_group per group == Philox4x32-10 of (g, c1, c2, c3), edge words included
    from mamba_cache.precision import word_conversions as wc

    @cuda.jit
    def run(out, groups, c1, c2, c3, k0, k1):
        i = cuda.grid(1)
        if i < groups.shape[0]:
            st = wc.philox_setup(c1, c2, c3, k0, k1)
            words = wc.philox_group(groups[i], st)
            for j in range(4):
                out[i, j] = words[j]

    groups = np.concatenate([[0, 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, 12)]).astype(np.int64)
    top = 2**32 - 1
    for c1, c2, c3, k0, k1 in ((0, 0, 0, 0, 0), (top, top, 1, top, top), (123457, 63, 1, 77, 9)):
        out = cuda.to_device(np.zeros((groups.size, 4), np.uint32))  # device arrays: no implicit copies
        run[1, 32](out, cuda.to_device(groups), c1, c2, c3, k0, k1)
        out = out.copy_to_host()
        counter = np.stack([groups, np.full(groups.size, c1), np.full(groups.size, c2), np.full(groups.size, c3)], -1)
        want = philox4x32_10(counter.astype(np.uint64), np.array([k0, k1], np.uint64))
        assert out.tobytes() == want.tobytes(), (c1, c2, c3, k0, k1)


@pytest.mark.slow  # NVVM over seven converting-commit kernels: a minute of compiles
def test_commit_kernels_ptx_keeps_the_buffer_in_registers_and_batches_wide_loads():
    # The design the benchmark depends on, checked on the sm_90 PTX (no GPU needed): no local memory
    # for any pair, every kind's 8 uint64 loads per thread (16 for float32 -> bfloat16 / float16
    # stochastic; 4 for the float64 paths' halved batch; a widening pair: 16 uint32 loads and 16
    # uint64 stores), and Philox on 32-bit high products (mul.hi.u32, which ptxas pairs with the
    # low product into one IMAD.WIDE.U32) with the work its groups share done once per thread.
    # float32 -> float16 stochastic has, per kind, one more group's code after the group loop (the
    # rare cases' full steps): its 2 loads and one Philox call.
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import re, types as pytypes
        from numba import cuda, types
        try:
            cuda.get_current_device()
        except Exception:  # no GPU: compile device functions for sm_90 all the same
            import numba.cuda.dispatcher as dispatcher
            dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
        from mamba_cache.precision import commit_kernels as ck
        u64, i32, i64 = types.Array(types.uint64, 3, "C"), types.Array(types.int32, 1, "C"), types.int64
        F = {"f16": (5, 10), "bf16": (8, 7), "f32": (8, 23), "f64": (11, 52)}
        S = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8}
        for src, dst, mode in (("f32", "bf16", 2), ("f32", "bf16", 1), ("bf16", "f32", 1), ("f32", "f16", 2),
                               ("f16", "f32", 1), ("f16", "bf16", 1), ("f64", "bf16", 2)):
            spec = ck.spec_of(mode, F[src], F[dst], S[src], S[dst], 1024)
            kernel = ck.commit_kernels(spec, spec).scatter
            sig = (u64, u64, u64, u64, i64, i32, i32, i64, i64, i64, i32, i64, i64)
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, device=False, cc=(9, 0))
            local = len(re.findall(r"^\\s*(ld|st)\\.local", ptx, re.M))
            if S[src] == 2 and S[dst] == 4:  # widening: a uint32 load and a uint64 store per pair of elements
                loads = ptx.count("ld.global.u32") - 1  # less the row's accept length
                expected = 2 * 2 * ck.groups_per_thread(spec)
                assert ptx.count("st.global.u64") == expected, (src, dst, "uint64 stores")
            else:
                loads = ptx.count("ld.global.u64")
                expected = 2 * ck.groups_per_thread(spec) * (S[src] // 2)
            redo = 2 if (src, dst, mode) == ("f32", "f16", 2) else 0  # kinds with a rare-case group after the loop
            products = ptx.count("mul.hi.u32")
            print(src, dst, mode, local, loads, expected + 2 * redo, products, 2 * ck.groups_per_thread(spec) + redo)
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "NvvmSupportError" in result.stderr or "libNVVM" in result.stderr:
        pytest.skip("NVVM is not installed: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert len(rows) == 7, result.stdout
    for src, dst, mode, local, loads, expected, products, groups in rows:
        assert local == "0", (src, dst, "local memory")
        assert loads == expected, (src, dst, "word loads", loads, expected)
        if mode == "2":  # Philox: 18 products per group, 2 more per kind shared by its groups
            assert int(products) == 18 * int(groups) + 2 * 2, (src, dst, "Philox products", products, groups)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_converting_tree_commit_on_the_word_path(rng, stochastic):
    # both kinds' slots a multiple of 4 elements (24 each); the node at index j consumed p + j + 1 tokens
    config = small_config(
        recurrent_state_size=4,
        conv_dim=8,
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float32",
        intermediate_conv_state_dtype="float16",
        stochastic_rounding=stochastic,
        rounding_seed=5,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    before = host_pools(managers[0])
    nodes = [[0, 2, 3], [1, -1, -1], [3, 0, 9], [-1, -1, -1]]
    accept = [3, 1, 2, 3]
    positions = [5, 6, 7, 8]
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(4, 4)
        manager.scatter_accepted_tree_states(
            device_int32(backend, nodes), device_int32(backend, accept), positions=device_int32(backend, positions)
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], "tree")
    layers = config.num_recurrent_layers
    for kind, pool in enumerate(("recurrent", "conv")):
        steps = before[f"intermediate_{pool}"].reshape(layers, config.max_batch_size * 4, -1)
        inter = as_dtype(
            config.intermediate_recurrent_state_dtype if kind == 0 else config.intermediate_conv_state_dtype
        )
        main = as_dtype(config.recurrent_state_dtype if kind == 0 else config.conv_state_dtype)
        got = after[0][pool].reshape(layers, config.max_batch_size, -1)
        for row, (node, depth) in {0: (3, 2), 1: (1, 0), 2: (0, 1)}.items():  # row 3: no node, slot untouched
            want = convert(
                steps[:, row * 4 + node].view(inter),
                main,
                stochastic=stochastic,
                seed=5,
                kind=kind,
                layer=np.arange(layers),
                position=positions[row] + depth + 1,
            )
            assert got[:, row].tobytes() == bits_of(want).tobytes(), (pool, row)
        assert got[:, 3:].tobytes() == before[pool].reshape(layers, config.max_batch_size, -1)[:, 3:].tobytes()


@pytest.mark.parametrize("conv_dim", [7, 8], ids=["element-path", "word-path"])
def test_one_kind_converts_while_the_other_copies_in_the_same_launch(rng, conv_dim):
    config = small_config(
        recurrent_state_size=4,
        conv_dim=conv_dim,
        recurrent_state_dtype="bfloat16",
        intermediate_recurrent_state_dtype="float32",
        conv_state_dtype="float16",  # equal dtypes: the conv kind copies bits
        stochastic_rounding=True,
        rounding_seed=1,
    )
    managers = make_pair(config)
    fill_random(managers, rng)  # random bit patterns: NaN payloads must survive the copy
    before = host_pools(managers[0])
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(3, 4)
        manager.scatter_mtp_states(
            device_int32(backend, [2, 3, 1]),
            state_indices=device_int32(backend, [1, 4, 2]),
            positions=device_int32(backend, [3, 4, 5]),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], "copy + convert")
    layers = config.num_recurrent_layers
    steps = before["intermediate_conv"].reshape(layers, config.max_batch_size * 4, -1)
    conv = after[0]["conv"].reshape(layers, config.max_batch_size, -1)
    for row, (slot, accepted) in enumerate(((1, 2), (4, 3), (2, 1))):
        assert conv[:, slot].tobytes() == steps[:, row * 4 + accepted - 1].tobytes()


F16_PAIRS = [("float16", "float32"), ("float32", "float16"), ("float16", "bfloat16"), ("bfloat16", "float16")]
F16_PAIRS += [("float16", "float64")]


def float16_edge_bits(rng, dtype, size):
    """``size`` bit patterns of ``dtype`` (as its unsigned word) for a float16 conversion, shuffled.

    Random patterns of every exponent; NaNs with random payloads (quiet and signalling, both
    signs); infinities; zeros of both signs; subnormals of ``dtype``; values whose float16 is
    subnormal, overflows or sits at the infinity edge; exact float16 ties (and their neighbours)
    for a wider ``dtype``; and a share of ordinary values in the float16 normal range, so that some
    groups of 4 have no rare element and others have one at each position.
    """
    dtype = as_dtype(dtype)
    width = 8 * dtype.itemsize
    word = np.dtype(f"u{dtype.itemsize}")
    man = {16: 10 if dtype == np.float16 else 7, 32: 23, 64: 52}[width]
    exp_all = ((1 << (width - 1 - man)) - 1) << man
    sign = word.type(1) << word.type(width - 1)
    n = max(size // 16, 32)  # about 14 n patterns: repeated or cut to size, then shuffled

    def rand(count, high):
        return rng.integers(0, high, count, dtype=np.uint64).astype(word)

    signs = (rand(n, 2) * sign).astype(word)
    nan_payload = rand(n, (1 << man) - 1) + word.type(1)  # never zero: a NaN, quiet or signalling
    parts = [
        rand(n, 1 << min(width, 63)) | (rand(n, 2) * sign if width == 64 else word.type(0)),
        signs | word.type(exp_all) | nan_payload,
        np.array([exp_all, exp_all | int(sign), 0, int(sign)], dtype=word),
        signs | rand(n, 1 << man),  # zeros and subnormals of dtype
    ]
    with np.errstate(all="ignore"):
        magnitudes = np.concatenate(
            [
                rng.uniform(0, 1, n) * 2.0**-14,  # float16 subnormal results
                rng.uniform(0, 1, n) * 2.0**-24,  # half the smallest subnormal and below
                rng.uniform(65504, 65536, n),  # the infinity edge
                rng.uniform(65536, 1e6, n),  # overflow
                np.array([65504.0, 65519.0, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26]),
                rng.uniform(-60000, 60000, 4 * n),  # ordinary float16 normals
            ]
        )
        values = magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)
        parts.append(values.astype(dtype).view(word))
    if width == 32:  # either side of each bound of float32 -> float16 stochastic's fast path
        edges = [0x007FFFFF, 0x00800000, 0x387FFFFF, 0x38800000, 0x38800001, 0x477FDFFF, 0x477FE000, 0x477FFFFF]
        edges += [0x47800000, 0x7F7FFFFF]
        parts.append(np.array(edges, dtype=word) | (rand(len(edges), 2) * sign).astype(word))
    if width > 16:  # exact float16 ties and their neighbours: dropped bits 100..0, 100..01, 011..1
        drop = man - 10
        tie = 1 << (drop - 1)
        normal = np.clip(rng.uniform(-60000, 60000, n), -65000, 65000).astype(dtype).view(word)
        base = normal & ~word.type((1 << drop) - 1)
        for delta in (0, 1, -1):
            parts.append(base | word.type(tie + delta))
    bits = np.concatenate(parts).astype(word)
    return np.resize(rng.permutation(bits), size)[rng.permutation(size)]


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("main,inter", F16_PAIRS, ids=str)
def test_float16_commits_on_the_gpu_match_numpy_on_edge_bit_patterns(rng, main, inter, stochastic):
    # The hardware conversions (cvt.rn.f16.f32, cvt.f32.f16) with the NaN select, and float32 ->
    # float16 stochastic's rare-case branch, which the simulator cannot check (it has no
    # libdevice and does Python arithmetic): every float16 pair on random bit patterns of every
    # category, slots of several chunks (4096 elements: on a chunk edge; 3084: off it, still the
    # word path), every pool bit for bit.
    config = small_config(
        num_recurrent_layers=2,
        max_batch_size=4,
        recurrent_state_num_heads=2,
        recurrent_state_head_dim=16,
        recurrent_state_size=128,
        conv_dim=1028,
        conv_kernel=3,
        max_intermediate_seq_len=4,
        recurrent_state_dtype=main,
        conv_state_dtype=main,
        intermediate_recurrent_state_dtype=inter,
        intermediate_conv_state_dtype=inter,
        stochastic_rounding=stochastic,
        rounding_seed=2**63 + 29,
    )
    managers = make_pair(config)
    fill_bits(managers, rng)
    for pool in ("intermediate_recurrent", "intermediate_conv"):
        shape = getattr(managers[0].pools, pool).shape
        bits = float16_edge_bits(rng, inter, int(np.prod(shape)))
        values = bits.view(as_dtype(inter))
        with np.errstate(invalid="ignore"):  # signalling NaNs
            wide = values.astype(np.float64)
        assert np.isnan(wide).any() and np.isinf(wide).any() and (wide == 0).any()
        write_same(managers, pool, values.reshape(shape))
    before = host_pools(managers[0])
    accept, indices, positions = [1, 2, 3, 3], [2, 0, 3, 1], [0, 9, 2**31 - 4, 65535]
    for manager, backend in zip(managers, ("numpy", "numba"), strict=True):
        manager.reshape_intermediate_states(4, 4)
        manager.scatter_mtp_states(
            device_int32(backend, accept),
            state_indices=device_int32(backend, indices),
            positions=device_int32(backend, positions),
        )
    after = [host_pools(m) for m in managers]
    assert_pools_equal(after[0], after[1], f"{main} <- {inter}")
    for pool in ("recurrent", "conv"):  # every slot was committed: none kept its old bits
        for slot in range(4):
            assert (after[0][pool][:, slot] != before[pool][:, slot]).any(), (pool, slot)


def test_float16_stochastic_fast_path_flags_nans_whose_sum_wraps():
    # float32 -> float16 stochastic adds the random bits to the float32 pattern before the
    # truncating conversion: for a negative NaN that sum passes 2**32. It must wrap quietly (no
    # overflow warning on the simulator's NumPy scalars) and the element must be flagged for the
    # full steps; an ordinary value next to it takes the fast path.
    from mamba_cache.precision import word_conversions as wc

    @cuda.jit
    def run(out, xs, rs):
        i = cuda.grid(1)
        if i < xs.shape[0]:
            h, rare = wc.f16_stochastic_fast(xs[i], rs[i])
            out[i, 0] = h
            out[i, 1] = 1 if rare else 0

    xs = np.array([0xFFFFFFFF, 0xFFFFE001, 0x7FFFFFFF, 0x3F800000], np.uint32)  # three NaNs, then 1.0
    rs = np.full(xs.size, 0xFFFFFFFF, np.uint32)
    out = cuda.to_device(np.zeros((xs.size, 2), np.uint32))
    run[1, 32](out, cuda.to_device(xs), cuda.to_device(rs))
    got = out.copy_to_host()
    assert got[:3, 1].tolist() == [1, 1, 1], got
    assert got[3].tolist() == [0x3C00, 0], got  # 1.0 plus 8191 / 8192 of a float16 place, truncated


def test_float16_stochastic_fast_path_flag_at_its_bounds():
    # The fast path covers |x| < 2**-126 and 2**-14 <= |x| < 65504; one float32 pattern either side of
    # each bound, both signs: the flag must send exactly the outside ones to the full steps (the redo
    # of a flagged group would hide a bound moved inward, and a bound moved outward gives wrong bits
    # only for some random words), and an unflagged result must be the reference's bits.
    from mamba_cache.precision import word_conversions as wc
    from mamba_cache.precision.reference import convert_bits

    @cuda.jit
    def run(out, xs, rs):
        i = cuda.grid(1)
        if i < xs.shape[0]:
            h, rare = wc.f16_stochastic_fast(xs[i], rs[i])
            out[i, 0] = h
            out[i, 1] = 1 if rare else 0

    edges = {0x007FFFFF: 0, 0x00800000: 1, 0x387FFFFF: 1, 0x38800000: 0, 0x477FDFFF: 0, 0x477FE000: 1}
    xs = np.array([x | sign for x in edges for sign in (0, 0x80000000)], np.uint32)
    flags = [edges[x & 0x7FFFFFFF] for x in xs.tolist()]
    rs = np.resize(np.array([0, 0xFFFFFFFF, 0x80000000, 0x1234ABCD], np.uint32), xs.size)
    out = cuda.to_device(np.zeros((xs.size, 2), np.uint32))
    run[1, 32](out, cuda.to_device(xs), cuda.to_device(rs))
    got = out.copy_to_host()
    assert got[:, 1].tolist() == flags, [hex(x) for x in xs[got[:, 1] != flags]]
    fast = np.array(flags) == 0
    want = convert_bits(xs[fast], (8, 23), (5, 10), rs[fast])
    assert got[fast, 0].tolist() == want.tolist()


def test_device_stored_value_matches_the_reference_bit_for_bit():
    # stored_value (replay and decode with 16-bit states) keys its stochastic rounding by
    # (element // 4, position, layer, kind) and the seed, as rounding_bits does: a few values,
    # elements of two groups, positions and layers that differ, both 16-bit formats and kinds
    from mamba_cache.precision.reference import convert_bits

    @cuda.jit
    def run(out, values, elements, positions, layers, kind, de, dm, seed_lo, seed_hi):
        i = cuda.grid(1)
        if i < values.shape[0]:
            element, position, layer = np.int64(elements[i]), np.int64(positions[i]), np.int64(layers[i])  # as callers
            out[i] = kernels.stored_value(
                values[i], kernels.MODE_STOCHASTIC, de, dm, element, position, layer, kind, seed_lo, seed_hi
            )

    values = np.array([1.0 + 2.0**-20, -3.3, 0.1, 1e-3, 7.77, -0.5 - 2.0**-18, 123.456, 2.0**-15 * 1.3] * 2, np.float32)
    elements = np.arange(values.size, dtype=np.int32) % 8
    positions = np.array([0, 1, 5, 2**31 - 1, 17, 3, 65536, 9] * 2, np.int32)
    layers = np.array([3, 0, 2, 1, 4, 3, 0, 2, 1, 4, 2, 0, 3, 1, 0, 2], np.int32)
    seed = 0x0123456789ABCDEF
    for (de, dm), kind in (((5, 10), 0), ((8, 7), 1)):
        out = cuda.to_device(np.zeros(values.size, np.float32))
        run[1, 32](
            out, cuda.to_device(values), cuda.to_device(elements), cuda.to_device(positions), cuda.to_device(layers),
            kind, de, dm, seed & 0xFFFFFFFF, seed >> 32,
        )  # fmt: skip
        words = rounding_bits(seed, layers, kind, positions, 8)[np.arange(values.size), elements]
        narrow = convert_bits(values.view(np.uint32), (8, 23), (de, dm), words)
        want = convert_bits(narrow, (de, dm), (8, 23)).astype(np.uint32)
        assert out.copy_to_host().view(np.uint32).tolist() == want.tolist(), (de, dm)
