"""Chunked prefill that stops at the prefix store's block boundaries, and tracking during decoding.

The model is the NumPy twin of the integration loop (``examples/integrate_engine_numpy.py``), so
this runs anywhere; the store calls are the same on the Numba backend. ``tests/test_integrate.py``
runs :func:`demo` and checks that every checkpoint, restored into another slot, continues exactly
as decoding the whole prompt does (bit for bit: the same float32 operations on both paths).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the twin module beside this file

from integrate_engine_numpy import VOCAB, commit, make_config, make_weights, prefill_chunk, verify  # noqa: E402

from mamba_cache import NumpyMambaCacheManager  # noqa: E402
from mamba_cache.prefix import PrefixStateCache  # noqa: E402


# --8<-- [start:admit]
def admit(cache, store, weights: list, prompt: np.ndarray, slot: int, kv_hit: int | None = None) -> int:
    """Start a request in ``slot``: restore the longest checkpoint, prefill the rest, checkpoint boundaries.

    ``kv_hit``: how many prompt tokens the attention layers' KV cache already holds (a hybrid model
    can skip only what both caches hold). Returns the number of tokens restored from the store.
    """
    bs = store.block_size
    handle = store.match(prompt, max_tokens=kv_hit)  # longest n * bs < len(prompt), n * bs <= kv_hit
    if handle is not None:
        store.restore(handle, slot)  # one launch: every layer, both kinds
        done = handle.length
    else:
        cache.clear_slot(slot)
        done = 0
    restored = done
    while done < len(prompt):
        end = min((done // bs + 1) * bs, len(prompt))  # stop the chunk at the next block boundary
        prefill_chunk(cache, weights, prompt[done:end], slot)
        done = end
        if done % bs == 0:  # the slot holds the state after exactly done = n * bs tokens
            store.insert(prompt[:done], slot)  # already present: refreshed, nothing copied
    return restored


# --8<-- [end:admit]


# --8<-- [start:track]
def speculative_round(cache, store, weights, history: list, drafts: np.ndarray, accept: np.ndarray, slots) -> None:
    """One verify + commit over ``active`` rows, checkpointing any block boundary a window crosses.

    ``history[b]``: row ``b``'s tokens so far (its state has consumed ``p = len(history[b])``);
    ``drafts`` ``[active, V]``; the row's state after draft step ``t`` has consumed ``p + t + 1``.
    """
    active, verify_len = drafts.shape
    bs = store.block_size
    entries = np.full(active, -1, np.int32)  # -1: the row tracks nothing
    steps = np.full(active, -1, np.int32)
    boundaries = [(len(tokens) // bs + 1) * bs for tokens in history]  # the next one after p
    for b in range(active):
        p = len(history[b])
        if boundaries[b] <= p + verify_len:  # inside this window (bs >= V: at most one boundary)
            entry = store.reserve()  # pinned, no key yet (None when every entry is pinned)
            if entry is not None:
                entries[b], steps[b] = entry, boundaries[b] - p - 1
    verify(cache, weights, drafts, slots)
    # the commit copies (scatter) or recomputes (replay) the state after step steps[b] into the entry
    commit(cache, accept, slots, store=store, track_entries=entries, track_steps=steps)
    for b in range(active):
        history[b].extend(int(token) for token in drafts[b, : accept[b]])
        if entries[b] >= 0:
            if accept[b] > steps[b]:  # the row reached its boundary: key the entry by that prefix
                store.publish(int(entries[b]), np.array(history[b][: boundaries[b]]))
            else:
                store.release(int(entries[b]))


# --8<-- [end:track]


def state_after(weights: list, tokens, dtype: str) -> list:
    """Every layer's main states after decoding ``tokens`` from zero in a fresh cache (the reference)."""
    cache = NumpyMambaCacheManager(make_config("scatter", dtype, batch=1))
    prefill_chunk(cache, weights, np.asarray(tokens), 0)
    return [np.array(a) for layer in range(2) for a in (cache.get_recurrent_state(layer), cache.get_conv_state(layer))]


def slot_state(cache, slot: int) -> list:
    """Every layer's main states of one slot (copies)."""
    return [
        np.array(a[slot])
        for layer in range(cache.num_layers())
        for a in (cache.get_recurrent_state(layer), cache.get_conv_state(layer))
    ]


def demo(commit_mode: str = "scatter", dtype: str = "float32", seed: int = 0) -> dict:
    """Two requests share a 20-token system prompt (block size 8); a third decodes speculatively.

    Returns the evidence: how many tokens each admission restored, each row's final length, and
    per checkpoint found (row, length, whether restoring it equals decoding its prefix from zero,
    bit for bit).
    """
    rng = np.random.default_rng(seed)
    weights = make_weights()
    config = make_config(commit_mode, dtype)  # B = 4 slots, V = 4
    cache = NumpyMambaCacheManager(config)
    # --8<-- [start:store]
    store = PrefixStateCache(cache, entries=16, block_size=8, namespace="integrate-demo")
    # --8<-- [end:store]
    system = rng.integers(0, VOCAB, 20)
    first = np.concatenate([system, rng.integers(0, VOCAB, 5)])  # 25 tokens: checkpoints at 8, 16, 24
    second = np.concatenate([system, rng.integers(0, VOCAB, 9)])  # shares 16 tokens' blocks with `first`
    restored = [admit(cache, store, weights, first, slot=0), admit(cache, store, weights, second, slot=1)]
    # speculative decoding of both, rows 0 and 1 in slots 0 and 1; their windows cross 32
    history = [list(first), list(second)]
    slots = np.array([0, 1], dtype=np.int32)
    for _ in range(4):
        drafts = rng.integers(0, VOCAB, (2, config.max_intermediate_seq_len))
        accept = rng.integers(1, config.max_intermediate_seq_len + 1, 2).astype(np.int32)
        speculative_round(cache, store, weights, history, drafts, accept, slots)
    # every checkpoint the store now holds, restored into slot 3, against decoding its prefix from zero
    checkpoints = []  # (row, prefix length, restored state == decoding the prefix from zero)
    for row, tokens in enumerate(history):
        for n in range(1, len(tokens) // 8 + 1):
            handle = store.match(tokens[: n * 8 + 1])  # one token past the boundary: matches n * 8
            if handle is None or handle.length != n * 8:
                continue
            store.restore(handle, 3)
            want = state_after(weights, tokens[: n * 8], dtype)
            same = all(got.tobytes() == ref[0].tobytes() for got, ref in zip(slot_state(cache, 3), want, strict=True))
            checkpoints.append((row, n * 8, same))
    return {"restored": restored, "checkpoints": checkpoints, "tokens": [len(tokens) for tokens in history]}


if __name__ == "__main__":
    for mode in ("scatter", "replay"):
        result = demo(mode)
        print(mode, "restored", result["restored"], "tokens", result["tokens"], "checkpoints", result["checkpoints"])
