"""The tiny models in checkpoint mode (``commit_mode="checkpoint"``, both backends): decoding through the ring.

A checkpoint-mode verify pass reads each step's state with ``state_after`` (NumPy) or the reading
device functions of ``mamba_cache.checkpoint.reading`` (Numba) from checkpoint + ring, and writes
the step's stash fields into the ring; ``checkpoint_mtp_states`` counts and folds. The claim, on
each backend: the logits of every window step, the tokens a greedy decoder emits and every slot's
current state equal sequential decoding of only the accepted tokens (scatter mode, one token at a
time, on the same backend), bit for bit, across many folds, with ``R = S`` and ``R > S``. NumPy vs
Numba agree within the replay tolerance.
"""

import numpy as np
import pytest
from helpers import (
    BACKENDS,
    REPLAY_TOLERANCE,
    SIMULATOR_LONG,
    publish_tracked,
    snapshot,
    to_host,
    track_next_boundaries,
)

from mamba_cache import Config
from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2

MODELS = {"mamba2": TinyMamba2, "gdn": TinyGatedDeltaNet}
VOCAB = 32
SEQ = 3
#: (mixer, state dtype, stochastic rounding, groups). TinyGatedDeltaNet refuses bfloat16 and stochastic rounding.
CASES = [
    ("mamba2", "float32", False, 1),
    ("mamba2", "bfloat16", False, 1),
    ("mamba2", "bfloat16", True, 1),
    ("mamba2", "float32", False, 2),
    ("gdn", "float32", False, 2),
    ("gdn", "float16", False, 2),
]


def model_config(mixer, dtype, stochastic=False, commit_mode="checkpoint", ring=SEQ, batch=4, groups=1):
    if mixer == "gdn":  # 4 value heads sharing `groups` key heads; key dim 8, value dim 4
        heads, dim, size = 4, 8, 4
        conv_dim = 2 * groups * dim + heads * size
    else:  # `groups` B/C groups of two heads each
        heads, dim, size = 2 * groups, 4, 8
        conv_dim = heads * dim + 2 * groups * size
    return Config(
        num_recurrent_layers=2,
        max_batch_size=batch,
        recurrent_state_num_heads=heads,
        recurrent_state_head_dim=dim,
        recurrent_state_size=size,
        conv_dim=conv_dim,
        conv_kernel=4,
        max_intermediate_seq_len=SEQ,
        recurrent_state_dtype=dtype,
        conv_state_dtype=dtype,
        commit_mode=commit_mode,
        history_len=ring if commit_mode == "checkpoint" else 0,
        mixer=mixer,
        n_groups=groups,
        stochastic_rounding=stochastic,
        rounding_seed=777,
    )


#: Both backends; the Numba cases are long on the simulator (a model step is dozens of launches).
ON_BACKENDS = pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=SIMULATOR_LONG)])


def make(mixer, dtype, stochastic, ring, seed, batch=4, groups=1, backend="numpy"):
    """A model and three caches: checkpoint mode, and two scatter-mode ones for the sequential reference."""
    ckpt = model_config(mixer, dtype, stochastic, ring=ring, batch=batch, groups=groups)
    scatter = model_config(mixer, dtype, stochastic, commit_mode="scatter", batch=batch, groups=groups)
    model = MODELS[mixer](ckpt, vocab_size=VOCAB, seed=seed)
    ref_model = MODELS[mixer](scatter, vocab_size=VOCAB, seed=seed)
    assert all(np.array_equal(model.weights[k], ref_model.weights[k]) for k in model.weights)
    caches = [BACKENDS[backend](ckpt), BACKENDS[backend](scatter), BACKENDS[backend](scatter)]
    return model, ref_model, caches


def main_pools(manager):
    pools = snapshot(manager)
    return {k: pools[k].tobytes() for k in ("recurrent", "conv")}


def assert_current_equals(spec, seq, label):
    """Every slot's folded state in ``spec`` has the bits of the same slot of ``seq``'s main pools."""
    for slot in range(spec.get_config().max_batch_size):
        recurrent, conv = spec.current_state(slot)
        for layer in range(spec.num_layers()):
            want_r = to_host(seq.get_recurrent_state(layer))[slot : slot + 1]
            want_c = to_host(seq.get_conv_state(layer))[slot : slot + 1]
            got_r, got_c = to_host(recurrent[layer]), to_host(conv[layer])
            assert got_r.tobytes() == want_r.tobytes(), f"{label}: recurrent, slot {slot}, layer {layer}"
            assert got_c.tobytes() == want_c.tobytes(), f"{label}: conv, slot {slot}, layer {layer}"


def greedy(logits, accepted):
    """The tokens a greedy decoder emits from one row's window: the argmax at each accepted step and the next."""
    return np.argmax(logits[: accepted + 1, :VOCAB], axis=1).tolist()


@ON_BACKENDS
@pytest.mark.parametrize("ring", [SEQ, 7], ids=["R=S", "R=7"])
@pytest.mark.parametrize(("mixer", "dtype", "stochastic", "groups"), CASES)
def test_speculative_decoding_in_checkpoint_mode_equals_sequential(
    backend, rng, mixer, dtype, stochastic, groups, ring
):
    """10 verify windows (V in [1, S]) with accept lengths 0 (padding), 1, V and random, over many folds."""
    seed = int(rng.integers(1 << 30))
    model, ref_model, (spec, seq, full) = make(mixer, dtype, stochastic, ring, seed, groups=groups, backend=backend)
    active, layers = 4, range(spec.num_layers())
    prompt = rng.integers(0, VOCAB, size=(active, 2))
    model.prefill(spec, prompt)
    ref_model.prefill(seq, prompt)
    consumed = np.full(active, prompt.shape[1], np.int64)
    assert_current_equals(spec, seq, "after the prefill")
    folds, pending = 0, 0
    for window in range(10):
        verify = SEQ if window % 3 == 0 else int(rng.integers(1, SEQ + 1))
        drafts = rng.integers(0, VOCAB, size=(active, verify))
        accept = rng.permutation(np.array([0, 1, verify, rng.integers(0, verify + 1)])).astype(np.int32)
        # The reference window: every draft decoded sequentially from the sequential state (a copy of it).
        for layer in layers:
            for getter in ("get_recurrent_state", "get_conv_state"):
                target, source = getattr(full, getter)(layer), to_host(getattr(seq, getter)(layer))
                if isinstance(target, np.ndarray):
                    target[:] = source
                else:
                    target.copy_to_device(source)
        want = np.stack(
            [to_host(ref_model.decode_step(full, drafts[:, t], positions=consumed + t)) for t in range(verify)], axis=1
        )
        assert (spec.checkpoint_positions() + spec.history_lengths() == consumed).all()
        before, p0 = main_pools(spec), spec.checkpoint_positions()
        got = model.verify(spec, drafts)
        assert main_pools(spec) == before, "the checkpoint-mode verify pass wrote the main pools"
        assert got.shape == want.shape and got.dtype == np.float32
        assert got.tobytes() == want.tobytes(), f"logits of window {window}, accept {accept.tolist()}"
        for row in range(active):
            assert greedy(got[row], accept[row]) == greedy(want[row], accept[row])
        spec.checkpoint_mtp_states(accept)
        ref_model.decode_accepted(seq, drafts, accept, positions=consumed)
        consumed += accept
        folds += int((spec.checkpoint_positions() != p0).sum())
        assert (spec.history_lengths() <= ring - SEQ).all()
        pending += int(spec.history_lengths().sum())
        assert_current_equals(spec, seq, f"window {window}, accept {accept.tolist()}")
    assert folds >= (8 if ring == SEQ else 4), f"only {folds} folds: the test did not exercise the ring"
    if ring > SEQ:  # slots were compared while holding unfolded steps (current_state != the main pools)
        assert pending > 0
    assert np.abs(snapshot(seq)["recurrent"].view(spec.get_config().recurrent_state_dtype).astype(np.float64)).sum() > 0


@ON_BACKENDS
@pytest.mark.parametrize("ring", [SEQ, 7], ids=["R=S", "R=7"])
@pytest.mark.parametrize(("mixer", "dtype", "stochastic", "groups"), [CASES[0], CASES[2], CASES[5]])
def test_plain_decoding_in_checkpoint_mode_equals_sequential(backend, rng, mixer, dtype, stochastic, groups, ring):
    """Greedy decoding (V = 1: a window of one step, then its commit) over 2R + 3 tokens, slots out of order."""
    seed = int(rng.integers(1 << 30))
    model, ref_model, (spec, seq, _) = make(mixer, dtype, stochastic, ring, seed, 5, groups, backend)
    slots = np.array([3, 0, 4], np.int64)  # rows decode into these slots (state_indices of the commit)
    tokens = {"spec": rng.integers(0, VOCAB, size=3), "seq": None}
    tokens["seq"] = tokens["spec"].copy()
    for step in range(2 * ring + 3):
        got = model.decode_step(spec, tokens["spec"], slots=slots)
        want = to_host(ref_model.decode_step(seq, tokens["seq"], slots=slots, positions=np.full(3, step)))
        assert got.tobytes() == want.tobytes(), f"logits at step {step}"
        tokens = {"spec": np.argmax(got[:, :VOCAB], axis=1), "seq": np.argmax(want[:, :VOCAB], axis=1)}
        assert tokens["spec"].tolist() == tokens["seq"].tolist()
        assert (spec.checkpoint_positions() + spec.history_lengths())[slots].tolist() == [step + 1] * 3
    assert (spec.checkpoint_positions()[slots] >= 2 * (ring - SEQ + 1)).all()  # folded at least twice
    assert spec.checkpoint_positions()[[1, 2]].tolist() == [0, 0]  # untouched slots
    assert_current_equals(spec, seq, "after plain decoding")


def test_checkpoint_mode_positions_must_match_the_cache(rng):
    """In checkpoint mode the rounding keys come from p0 + h: a different ``positions`` is refused, nothing written."""
    model, _, (spec, _, _) = make("mamba2", "bfloat16", True, 7, 5)
    model.prefill(spec, rng.integers(0, VOCAB, size=(4, 2)))
    before = {name: view.copy() for name, view in spec.get_history(0).items()}
    with pytest.raises(ValueError, match="p0 \\+ h"):
        model.verify(spec, rng.integers(0, VOCAB, size=(4, 2)), positions=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="p0 \\+ h"):
        model.decode_step(spec, [1], slots=[0], positions=[5])
    with pytest.raises(ValueError, match="use verify"):
        model.decode_step(spec, [1], slots=[0], step=0)
    assert all(np.array_equal(view, before[name]) for name, view in spec.get_history(0).items())
    model.verify(spec, rng.integers(0, VOCAB, size=(4, 2)), positions=np.full(4, 2, np.int64))  # p0 + h = 2


@pytest.mark.parametrize(("mixer", "dtype", "stochastic", "groups"), [CASES[2], CASES[5]])
def test_chunked_prefill_in_checkpoint_mode_equals_sequential(rng, mixer, dtype, stochastic, groups):
    """A prompt prefilled in three chunks (each continuing from the slot's p0 + h) equals one sequential prefill."""
    model, ref_model, (spec, seq, _) = make(mixer, dtype, stochastic, 7, int(rng.integers(1 << 30)), groups=groups)
    prompt = rng.integers(0, VOCAB, size=(4, 11))
    for chunk in (prompt[:, :3], prompt[:, 3:4], prompt[:, 4:]):
        model.prefill(spec, chunk)
    ref_model.prefill(seq, prompt)
    assert (spec.checkpoint_positions() + spec.history_lengths()).tolist() == [11] * 4
    assert spec.checkpoint_positions().min() > 0  # folded during the prefill
    assert_current_equals(spec, seq, "after a chunked prefill")


@pytest.mark.parametrize(
    ("mixer", "dtype", "stochastic", "groups"),
    [pytest.param(*case, marks=SIMULATOR_LONG) for case in (CASES[2], CASES[5])],
)
def test_numba_checkpoint_decoding_matches_numpy(rng, mixer, dtype, stochastic, groups):
    """Prefill, verify windows and commits on both backends: logits, counters and current states within tolerance."""
    seed = int(rng.integers(1 << 30))
    models, caches = [], []
    for backend in ("numpy", "numba"):
        model, _, (cache, _, _) = make(mixer, dtype, stochastic, 5, seed, batch=3, groups=groups, backend=backend)
        models.append(model)
        caches.append(cache)
    prompt = rng.integers(0, VOCAB, size=(3, 2))
    for model, cache in zip(models, caches, strict=True):
        model.prefill(cache, prompt)
    tol = REPLAY_TOLERANCE[dtype]
    for window, accept in enumerate(([SEQ, 0, 2], [1, 0, 1])):  # R = 5: rows 0 and 2 fold, then leave a step
        drafts = rng.integers(0, VOCAB, size=(3, SEQ))
        accept = np.array(accept, np.int32)
        logits = [model.verify(cache, drafts) for model, cache in zip(models, caches, strict=True)]
        np.testing.assert_allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4, err_msg=f"window {window}")
        for cache in caches:
            cache.checkpoint_mtp_states(accept)
        assert caches[0].history_lengths().tolist() == caches[1].history_lengths().tolist()
        assert caches[0].checkpoint_positions().tolist() == caches[1].checkpoint_positions().tolist()
    assert caches[1].checkpoint_positions().any() and caches[1].history_lengths().any()  # folded, and pending steps
    dtype_of = caches[0].get_config().recurrent_state_dtype
    for slot in range(3):
        (rec_a, conv_a), (rec_b, conv_b) = caches[0].current_state(slot), caches[1].current_state(slot)
        for a, b in zip(rec_a + conv_a, rec_b + conv_b, strict=True):
            got = to_host(b).view(a.dtype).astype(np.float64)
            np.testing.assert_allclose(got, a.astype(np.float64), **tol, err_msg=f"slot {slot}, {dtype_of}")


@ON_BACKENDS
@pytest.mark.parametrize(("mixer", "dtype", "stochastic", "groups"), [CASES[2], CASES[5]])
def test_restored_prefix_decodes_as_the_whole_prompt_in_checkpoint_mode(backend, rng, mixer, dtype, stochastic, groups):
    """Prefixes inserted after a prefill and tracked by checkpoint commits restore to the whole prompt's bits."""
    from mamba_cache.prefix import PrefixStateCache

    bs, active = 4, 2
    model, ref_model, (cache, _, _) = make(mixer, dtype, stochastic, 5, int(rng.integers(1 << 30)), 3, groups, backend)
    store = PrefixStateCache(cache, entries=8, block_size=bs)
    prompt = rng.integers(0, VOCAB, size=(active, 2 * bs))
    model.prefill(cache, prompt)  # R = 5: the slots folded and hold unfolded steps
    assert cache.history_lengths()[:active].any()
    inserted = store.insert_many([row for row in prompt], np.arange(active, dtype=np.int32))
    history = [list(row) for row in prompt]
    published = 0
    for _ in range(4):
        drafts = rng.integers(0, VOCAB, size=(active, SEQ))
        accept = rng.integers(1, SEQ + 1, size=active).astype(np.int32)
        entries, steps = track_next_boundaries(store, history, bs, SEQ)
        model.verify(cache, drafts)
        cache.checkpoint_mtp_states(accept, store=store, track_entries=entries, track_steps=steps)
        published += publish_tracked(store, history, drafts, accept, entries, steps)
    assert published >= 2
    cases = [(inserted[b], history[b][: 2 * bs] + [int(rng.integers(0, VOCAB))]) for b in range(active)]
    for b in range(active):
        tokens = history[b] + [int(rng.integers(0, VOCAB))]
        cases.append((store.match(np.array(tokens)), tokens))
    for handle, tokens in cases:
        assert handle is not None and handle.length == (len(tokens) - 1) // bs * bs
        store.restore(handle, slot=2)
        assert cache.checkpoint_positions()[2] == handle.length and cache.history_lengths()[2] == 0
        out = np.stack([model.decode_step(cache, [t], slots=[2])[0] for t in tokens[handle.length :]])
        plain = BACKENDS[backend](ref_model.config)  # scatter mode: the whole prompt, token by token
        want = np.stack(
            [to_host(ref_model.decode_step(plain, [t], slots=[2], positions=[i]))[0] for i, t in enumerate(tokens)]
        )[handle.length :]
        assert out.tobytes() == want.tobytes(), handle
        recurrent, conv = cache.current_state(2)
        plain_bits = snapshot(plain)
        for layer in range(cache.num_layers()):
            assert to_host(recurrent[layer]).tobytes() == plain_bits["recurrent"][layer, 2:3].tobytes()
            assert to_host(conv[layer]).tobytes() == plain_bits["conv"][layer, 2:3].tobytes()
