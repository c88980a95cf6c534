"""Several checkpoints from one chunked prefill: each equals the per-token decode's state within the tolerance table.

The chunked forms (Mamba2's SSD scan, Gated DeltaNet's chunked delta rule) reorder the per-token
sums, so the comparisons use `deviation` against ``CHUNKED_TOLERANCE`` (measured and justified by
``benchmarks/chunked_tolerance.py`` and the docs), never bit equality; what a chunked prefill must
NOT touch (other slots, other entries, everything on a refused call) is compared bit for bit.
"""

import pathlib
import sys

import numpy as np
import pytest
from helpers import BACKENDS, SEED, SIMULATOR_LONG, assert_same_bits, simulator_long, snapshot, to_host

from mamba_cache.models.chunked import (
    CHUNKED_TOLERANCE,
    advance,
    boundaries,
    deviation,
    gated_delta_chunked,
    ssd_chunked,
)
from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixStateCache
from mamba_cache.replay.reference import gdn_step, mamba2_step

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.chunked_tolerance import config_for, host, per_token  # noqa: E402

MODELS = {"mamba2": TinyMamba2, "gdn": TinyGatedDeltaNet}
HEAD = 3  # tokens every slot decodes one at a time first: the prefill starts from a non-zero state
COUNT = 12  # prompt tokens
POSITIONS = [1, 4, 5, 7, 8, 10, 12]  # on chunk 4's edges (4, 8, 12), chunk 5's (5, 10), off both (1, 7)
SLOT = 2


def close(got, want, dtype: str, kind: str, context: str) -> None:
    value, limit = deviation(got, want), CHUNKED_TOLERANCE[dtype][kind]
    assert value <= limit, f"{context}: {kind} deviation {value:.2e} > tolerance {limit:.0e}"


def store_bits(store) -> dict:
    return {f"entries_{i}": to_host(pool) for i, pool in enumerate(store.entry_pools)}


def setup(backend, mixer, dtype, rng, entries=None, **overrides):
    """A model, a cache whose every slot has decoded HEAD random tokens, a store, a prompt, the per-token truth."""
    config = config_for(mixer, dtype, batch=4, **overrides)
    model = MODELS[mixer](config, vocab_size=32, seed=SEED % 997)
    head = rng.integers(0, 32, size=(config.max_batch_size, HEAD))
    prompt = rng.integers(0, 32, COUNT)
    cache = BACKENDS[backend](config)
    model.prefill(cache, head)
    store = PrefixStateCache(cache, entries=entries or len(POSITIONS) + 2, block_size=1)
    want, want_out = per_token(model, BACKENDS[backend], config, np.concatenate([head[SLOT], prompt]))
    return model, cache, store, prompt, want, want_out


def run_prefill(backend, mixer, dtype, chunk, rng, positions=POSITIONS, **overrides):
    """Prefill slot SLOT with checkpoints into reserved entries; check them, the slot, and what must stay."""
    model, cache, store, prompt, want, want_out = setup(backend, mixer, dtype, rng, **overrides)
    entries = [store.reserve() for _ in positions]
    before, before_entries = snapshot(cache), store_bits(store)
    out = model.prefill_chunked(
        cache, prompt, SLOT, chunk_size=chunk, checkpoints=positions, store=store, entries=entries, position=HEAD
    )
    close(to_host(out), want_out[HEAD:], dtype, "prefill output", "outputs")
    layers = range(cache.get_config().num_recurrent_layers)
    got = {}
    for p, entry in zip(positions, entries, strict=True):
        rec, conv = (host(pool, dtype) for pool in store.entry_state(entry))
        got[p] = (rec, conv)
        # layer 0's conv inputs do not depend on any mixer: its windows are the per-token ones, bit for bit
        assert conv[0].tobytes() == want[HEAD + p][0][1].tobytes(), f"checkpoint {p}: layer 0's conv window"
        for layer in layers:
            close(rec[layer], want[HEAD + p][layer][0], dtype, "recurrent", f"checkpoint {p}, layer {layer}")
            close(conv[layer], want[HEAD + p][layer][1], dtype, "conv", f"checkpoint {p}, layer {layer}")
    after = snapshot(cache)
    values = {k: v.view(dtype) if v.dtype.itemsize == np.dtype(dtype).itemsize else v for k, v in after.items()}
    for layer in layers:
        close(
            values["recurrent"][layer, SLOT], want[HEAD + COUNT][layer][0], dtype, "recurrent", f"slot, layer {layer}"
        )
        close(values["conv"][layer, SLOT], want[HEAD + COUNT][layer][1], dtype, "conv", f"slot, layer {layer}")
    others = [s for s in range(cache.get_config().max_batch_size) if s != SLOT]
    assert_same_bits(
        {k: v[:, others] for k, v in after.items()}, {k: v[:, others] for k, v in before.items()}, "other slots"
    )
    untouched = [e for e in range(store.entries) if e not in entries]
    assert_same_bits(
        {k: v[:, untouched] for k, v in store_bits(store).items()},
        {k: v[:, untouched] for k, v in before_entries.items()},
        "other entries",
    )
    return got, to_host(out)


# ---------------------------------------------------------------- the NumPy forms alone
def sequential(mixer, state, inputs, read):
    """Per-token float32 steps: the state after every position and the read-out after every token."""
    step = mamba2_step if mixer == "mamba2" else gdn_step
    states, outputs = [state], []
    for t in range(read.shape[0]):
        state = step(state, *(x[t] for x in inputs))
        states.append(state)
        per_group = state.shape[0] // read.shape[1]
        heads = np.repeat(read[t], per_group, axis=0)
        outputs.append((state * heads[:, None, :]).sum(-1) if mixer == "mamba2" else (state * heads[..., None]).sum(1))
    return states, np.stack(outputs)


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 20])
def test_chunked_forms_equal_the_recurrence(rng, mixer, chunk):
    count, heads, dim, size, groups = 13, 4, 3, 5, 2

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    state = normal(heads, dim, size)
    log_decay = -np.abs(normal(count, heads)) * np.float32(0.5)
    edges = boundaries(count, chunk)
    if mixer == "mamba2":
        u, b, c = normal(count, heads, dim), normal(count, groups, size), normal(count, groups, size)
        out, states = ssd_chunked(state, log_decay, u, b, c, chunk)
        inputs = {"dA": np.exp(log_decay), "u": u, "B": b}
        want_states, want_out = sequential(mixer, state, (inputs["dA"], u, b), c)
    else:
        k, q = normal(count, groups, dim), normal(count, groups, dim)
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        v, beta = normal(count, heads, size), np.float32(1) / (1 + np.exp(-normal(count, heads)))
        out, states = gated_delta_chunked(state, log_decay, beta, k, v, q, chunk)
        inputs = {"g": np.exp(log_decay), "beta": beta, "k": k, "v": v}
        want_states, want_out = sequential(mixer, state, (inputs["g"], beta, k, v), q)
    assert states.shape == (len(edges), heads, dim, size) and states.dtype == np.float32
    close(out, want_out, "float32", "prefill output", "outputs")
    for at, edge in enumerate(edges):
        close(states[at], want_states[edge], "float32", "recurrent", f"boundary {edge}")
    for p in range(count + 1):
        got = advance(mixer, states, edges, p, inputs)
        close(got, want_states[p], "float32", "recurrent", f"position {p}")
        if p in edges:  # a boundary's state is returned as computed, no arithmetic
            assert got.tobytes() == states[list(edges).index(p)].tobytes()


# ---------------------------------------------------------------- the models, NumPy
CASES = [("mamba2", d) for d in ("float32", "float64", "float16", "bfloat16")] + [
    ("gdn", d) for d in ("float32", "float64", "float16")
]


@pytest.mark.parametrize(("mixer", "dtype"), CASES)
@pytest.mark.parametrize("chunk", [4, 5])  # divides the 12-token prompt, does not
def test_checkpoints_equal_per_token_states(rng, mixer, dtype, chunk):
    run_prefill("numpy", mixer, dtype, chunk, rng)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_rounding_checkpoints(rng, dtype):
    run_prefill("numpy", "mamba2", dtype, 5, rng, stochastic_rounding=True, rounding_seed=7)


def test_chunks_of_one_token_update_mamba2_state_as_the_decode_step(rng):
    """With Q = 1 the SSD state update is ``h * exp(dt * A) + u B``, the decode step's own operations.

    So layer 0 (whose inputs no mixer output touches) matches the per-token decode bit for bit in float32;
    only layers above see the outputs' other summation order (the docs' tolerance-table notes).
    """
    positions = list(range(1, COUNT + 1))
    model, cache, store, prompt, want, _ = setup("numpy", "mamba2", "float32", rng, entries=COUNT)
    entries = [store.reserve() for _ in positions]
    model.prefill_chunked(cache, prompt, SLOT, chunk_size=1, checkpoints=positions, store=store, entries=entries)
    for p, entry in zip(positions, entries, strict=True):
        assert store.entry_state(entry)[0][0].tobytes() == want[HEAD + p][0][0].tobytes(), p


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_replay_mode_main_pools(rng, mixer):
    """In replay mode the main pools hold the current states too: the prefill reads and writes them alike."""
    run_prefill("numpy", mixer, "float32", 4, rng, commit_mode="replay")


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
def test_checkpoint_slots_hold_the_entries_bits(rng, mixer):
    model, cache, store, prompt, _, _ = setup("numpy", mixer, "float16", rng)
    twin = BACKENDS["numpy"](cache.get_config())
    for layer in range(cache.get_config().num_recurrent_layers):
        twin.get_recurrent_state(layer)[...] = cache.get_recurrent_state(layer)
        twin.get_conv_state(layer)[...] = cache.get_conv_state(layer)
    entries = [store.reserve() for _ in (3, 8)]
    model.prefill_chunked(cache, prompt, SLOT, chunk_size=4, checkpoints=[3, 8], store=store, entries=entries)
    model.prefill_chunked(twin, prompt, SLOT, chunk_size=4, checkpoints=[3, 8], checkpoint_slots=[0, 3])
    for entry, slot in zip(entries, (0, 3), strict=True):
        rec, conv = store.entry_state(entry)
        for layer in range(cache.get_config().num_recurrent_layers):
            assert rec[layer].tobytes() == twin.get_recurrent_state(layer)[slot].tobytes()
            assert conv[layer].tobytes() == twin.get_conv_state(layer)[slot].tobytes()
    for layer in range(cache.get_config().num_recurrent_layers):
        assert cache.get_recurrent_state(layer)[SLOT].tobytes() == twin.get_recurrent_state(layer)[SLOT].tobytes()


@pytest.mark.parametrize("mixer", ["mamba2", "gdn"])
@simulator_long(backend="numba")
def test_restored_checkpoint_decodes_like_the_whole_prompt(backend, rng, mixer):
    """Publish, match and restore a chunked-prefill checkpoint; decode the rest one token at a time."""
    config = config_for(mixer, "float32")
    model = MODELS[mixer](config, vocab_size=32, seed=SEED % 997)
    prompt = rng.integers(0, 32, COUNT)
    whole = np.concatenate([prompt, rng.integers(0, 32, 3)])
    truth, truth_out = per_token(model, BACKENDS[backend], config, whole)
    cache = BACKENDS[backend](config)
    store = PrefixStateCache(cache, entries=4, block_size=1)
    positions = [5, 8]  # inside the second chunk of 4 tokens, and on an edge
    entries = [store.reserve() for _ in positions]
    model.prefill_chunked(cache, prompt, 0, chunk_size=4, checkpoints=positions, store=store, entries=entries)
    for p, entry in zip(positions, entries, strict=True):
        store.publish(entry, prompt[:p])
    for p in positions:
        handle = store.match(whole, max_tokens=p)
        assert handle is not None and handle.length == p
        store.restore(handle, 1)
        got = [to_host(model.decode_step(cache, [t], slots=[1]))[0] for t in whole[p:]]
        close(np.stack(got), truth_out[p:], "float32", "decode output", f"restored at {p}")
        for layer in range(config.num_recurrent_layers):
            state = host(cache.get_recurrent_state(layer), config.recurrent_state_dtype)[1]
            close(state, truth[len(whole)][layer][0], "float32", "recurrent", f"restored at {p}, layer {layer}")


# ---------------------------------------------------------------- Numba (the CUDA simulator here)
NUMBA_CASES = [
    ("mamba2", "float32", 4, {}),
    ("gdn", "float32", 5, {}),
    pytest.param("mamba2", "float16", 5, {}, marks=SIMULATOR_LONG),
    pytest.param("mamba2", "bfloat16", 4, {}, marks=SIMULATOR_LONG),
    pytest.param("mamba2", "bfloat16", 5, {"stochastic_rounding": True, "rounding_seed": 7}, marks=SIMULATOR_LONG),
    pytest.param("gdn", "float16", 4, {}, marks=SIMULATOR_LONG),
]


@pytest.mark.parametrize(("mixer", "dtype", "chunk", "overrides"), NUMBA_CASES)
def test_numba_checkpoints(mixer, dtype, chunk, overrides):
    """Numba: checkpoints equal Numba's per-token states, and NumPy's chunked ones, within the table."""
    positions = [1, 4, 5, 8, 12]
    got, out = run_prefill("numba", mixer, dtype, chunk, np.random.default_rng(SEED), positions, **overrides)
    want, want_out = run_prefill("numpy", mixer, dtype, chunk, np.random.default_rng(SEED), positions, **overrides)
    close(out, want_out, dtype, "prefill output", "numba vs numpy outputs")
    for p in positions:
        for kind, index in (("recurrent", 0), ("conv", 1)):
            close(got[p][index], want[p][index], dtype, kind, f"numba vs numpy, checkpoint {p}")


# ---------------------------------------------------------------- refusals change nothing
def bad_calls(count, entries):
    """``(name, changed keyword arguments, exception, message fragment)``: ``count`` entries, ``entries`` reserved."""
    return [
        ("empty prompt", dict(tokens=[]), ValueError, "at least one token"),
        ("token past the vocabulary", dict(tokens=[1, 32]), ValueError, r"tokens must be ids in \[0, 32\)"),
        ("2-D prompt", dict(tokens=[[1, 2]]), TypeError, "1-D"),
        ("slot out of range", dict(slot=4), IndexError, "slot"),
        ("chunk_size 0", dict(chunk_size=0), ValueError, r"chunk_size must be in"),
        ("chunk_size a float", dict(chunk_size=4.0), TypeError, "chunk_size"),
        ("checkpoint 0", dict(checkpoints=[0, 3]), ValueError, r"checkpoints must be positions in \[1, 6\]"),
        ("checkpoint past the prompt", dict(checkpoints=[3, 7]), ValueError, r"\[1, 6\]"),
        ("checkpoint twice", dict(checkpoints=[3, 3]), ValueError, "distinct"),
        ("no destinations", dict(entries=None, store=None), ValueError, "need destinations"),
        ("both destinations", dict(checkpoint_slots=[0, 1]), ValueError, "not both"),
        ("too few entries", dict(entries=entries[:1]), ValueError, "one destination per checkpoint"),
        ("entry not reserved", dict(entries=[entries[0], count - 1]), ValueError, "not reserved"),
        ("entry out of range", dict(entries=[entries[0], count]), IndexError, "entries"),
        ("entries repeated", dict(entries=[entries[0], entries[0]]), ValueError, "distinct"),
        ("entries without a store", dict(store=None), TypeError, "store"),
        ("slot as its own checkpoint", dict(entries=None, store=None, checkpoint_slots=[0, SLOT]), ValueError, "other"),
        ("checkpoint slots repeated", dict(entries=None, store=None, checkpoint_slots=[0, 0]), ValueError, "distinct"),
        ("checkpoint slot out of range", dict(entries=None, store=None, checkpoint_slots=[0, 4]), IndexError, "slots"),
        ("store without entries", dict(entries=None, checkpoint_slots=[0, 1]), ValueError, "store is given"),
        ("negative position", dict(position=-1), ValueError, "position"),
    ]


BAD = bad_calls(4, [0, 1])


@pytest.mark.parametrize("case", BAD, ids=[case[0] for case in BAD])
def test_refused_calls_change_nothing(rng, case):
    model, cache, store, _, _, _ = setup("numpy", "mamba2", "float16", rng, entries=4)
    entries = [store.reserve() for _ in range(2)]
    assert entries == [0, 1]  # as BAD was built
    name, changes, error, message = case
    arguments = dict(
        tokens=rng.integers(0, 32, 6), slot=SLOT, chunk_size=4, checkpoints=[3, 6], store=store, entries=entries
    )
    arguments.update(changes)
    before, before_entries = snapshot(cache), store_bits(store)
    reserved = [store.is_pinned(e) for e in range(store.entries)]
    with pytest.raises(error, match=message):
        model.prefill_chunked(cache, **arguments)
    assert_same_bits(snapshot(cache), before, name)
    assert_same_bits(store_bits(store), before_entries, name)
    assert [store.is_pinned(e) for e in range(store.entries)] == reserved, name


def test_refusals_in_other_modes(rng):
    config = config_for("mamba2", "float16", stochastic_rounding=True)
    model, cache = TinyMamba2(config, vocab_size=32), BACKENDS["numpy"](config)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="position is required"):
        model.prefill_chunked(cache, [1, 2], 0)
    checkpoint = config_for("mamba2", "float32", commit_mode="checkpoint", history_len=2)
    model_c = TinyMamba2(checkpoint, vocab_size=32)
    with pytest.raises(ValueError, match="commit_mode='checkpoint'"):
        model_c.prefill_chunked(BACKENDS["numpy"](checkpoint), [1, 2], 0)
    assert_same_bits(snapshot(cache), before, "stochastic")


# ---------------------------------------------------------------- scratch reused (CUDA-graph capturable)
@simulator_long(mixer="mamba2")
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_numba_second_call_allocates_nothing_and_gives_a_fresh_calls_bits(mixer, monkeypatch):
    """A chunked prefill after the first of its size allocates nothing and waits for nothing, same bits."""
    from numba import cuda

    rng = np.random.default_rng(SEED)
    config = config_for(mixer, "float32", batch=3)
    first, second = rng.integers(0, 32, 7), rng.integers(0, 32, 6)  # the second smaller: views of the buffers

    def build():
        cache = BACKENDS["numba"](config)
        return cache, PrefixStateCache(cache, entries=5, block_size=1)

    def call(model, cache, store, prompt, positions, start):
        entries = [store.reserve() for _ in positions]
        out = model.prefill_chunked(
            cache, prompt, 1, chunk_size=4, checkpoints=positions, store=store, entries=entries, position=start
        )
        return out

    def refuse(*args, **kwargs):
        raise AssertionError("the second chunked prefill allocated device memory or waited for the device")

    # reused: one model (one scratch) runs both prompts; the second under a ban on allocations and syncs
    model = MODELS[mixer](config, vocab_size=32, seed=SEED % 997)
    cache, store = build()
    call(model, cache, store, first, [2, 4, 7], 0)
    with monkeypatch.context() as patch:
        for name in ("device_array", "to_device", "pinned_array", "synchronize"):
            patch.setattr(cuda, name, refuse)
        out = call(model, cache, store, second, [3, 5], 7)
    got = {"out": to_host(out), **snapshot(cache), **store_bits(store)}
    # fresh: a second model with the same weights (its own first call) runs the second prompt
    cache, store = build()
    call(model, cache, store, first, [2, 4, 7], 0)
    out = call(MODELS[mixer](config, vocab_size=32, seed=SEED % 997), cache, store, second, [3, 5], 7)
    assert_same_bits(got, {"out": to_host(out), **snapshot(cache), **store_bits(store)}, "reused vs fresh scratch")
