"""Admitting requests with ONE chunked prefill that checkpoints every block boundary it passes.

``examples/integrate_prefill.py`` stops its prefill at each block boundary to insert a checkpoint;
here the prefill runs the whole rest of the prompt in one call (chunks of ``chunk_size``, which
need not divide the block size) and writes the state after each boundary straight into entries
reserved beforehand, which are then keyed with ``publish``. ``tests/test_integrate.py`` runs
``demo`` and checks that every checkpoint, restored into a spare slot, equals the per-token decode of
its prefix within the tolerance table (the chunked algebra orders its sums differently).
"""

from __future__ import annotations

import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.chunked import CHUNKED_TOLERANCE, deviation
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixStateCache


# --8<-- [start:admit]
def admit(model, cache, store, prompt: np.ndarray, slot: int, chunk_size: int = 64, kv_hit=None) -> int:
    """Start a request in ``slot``: restore the longest checkpoint, prefill the rest in one call.

    Every block boundary the rest of the prompt passes becomes a checkpoint of that same call.
    Returns the number of tokens restored from the store.
    """
    bs = store.block_size
    handle = store.match(prompt, max_tokens=kv_hit)  # longest cached n * bs < len(prompt)
    done = 0
    if handle is not None:
        store.restore(handle, slot)
        done = handle.length
    else:
        cache.clear_slot(slot)
    wanted = range((done // bs + 1) * bs, len(prompt) + 1, bs)  # boundaries past `done`
    reserved = [(c, store.reserve()) for c in wanted]
    reserved = [(c, entry) for c, entry in reserved if entry is not None]  # a store full of pins drops some
    model.prefill_chunked(
        cache,
        prompt[done:],
        slot,
        chunk_size=chunk_size,
        checkpoints=[c - done for c, _ in reserved],  # positions within the call's tokens
        store=store,
        entries=[entry for _, entry in reserved],
        position=done,  # tokens the slot's state had consumed (stochastic rounding keys)
    )
    for c, entry in reserved:
        store.publish(entry, prompt[:c])  # already cached elsewhere: that one is refreshed, this released
    return done


# --8<-- [end:admit]


def demo(seed: int = 0, chunk_size: int = 5) -> dict:
    """Two requests share a 20-token system prompt (block size 8); each is admitted with one prefill call.

    Returns how many tokens each admission restored and, per checkpoint in the store, its length and
    largest deviation (recurrent state, conv window) from decoding that prefix token by token.
    """
    rng = np.random.default_rng(seed)
    config = Config(
        num_recurrent_layers=2,
        max_batch_size=4,
        recurrent_state_num_heads=4,
        recurrent_state_head_dim=4,
        recurrent_state_size=8,
        conv_dim=4 * 4 + 2 * 2 * 8,
        conv_kernel=4,
        max_intermediate_seq_len=2,
        recurrent_state_dtype="float32",
        conv_state_dtype="float32",
        n_groups=2,
    )
    model = TinyMamba2(config, vocab_size=32, seed=seed)
    cache = NumpyMambaCacheManager(config)
    store = PrefixStateCache(cache, entries=8, block_size=8, namespace="chunked-demo")
    system = rng.integers(0, 32, 20)
    first = np.concatenate([system, rng.integers(0, 32, 6)])  # 26 tokens: checkpoints at 8, 16, 24
    second = np.concatenate([system, rng.integers(0, 32, 9)])  # restores 16, checkpoints its own 24
    restored = [admit(model, cache, store, first, 0, chunk_size), admit(model, cache, store, second, 1, chunk_size)]
    checkpoints = []  # (request, length, recurrent deviation, conv deviation)
    for request, tokens in enumerate((first, second)):
        for n in range(1, len(tokens) // 8 + 1):
            handle = store.match(tokens[: n * 8 + 1])
            store.restore(handle, 3)
            truth = NumpyMambaCacheManager(config)
            model.prefill(truth, tokens[None, : n * 8])  # token by token from zero
            worst = [0.0, 0.0]
            for layer in range(config.num_recurrent_layers):
                worst[0] = max(
                    worst[0], deviation(cache.get_recurrent_state(layer)[3], truth.get_recurrent_state(layer)[0])
                )
                worst[1] = max(worst[1], deviation(cache.get_conv_state(layer)[3], truth.get_conv_state(layer)[0]))
            checkpoints.append((request, n * 8, *worst))
    return {"restored": restored, "checkpoints": checkpoints, "tolerance": CHUNKED_TOLERANCE["float32"]}


if __name__ == "__main__":
    result = demo()
    print("restored:", result["restored"])
    for request, length, rec, conv in result["checkpoints"]:
        print(f"request {request}, checkpoint after {length:2d} tokens: recurrent {rec:.1e}, conv {conv:.1e}")
