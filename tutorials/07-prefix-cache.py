# %% [markdown]
# # 07 · Prefix caching: reuse the state of a shared prompt prefix
#
# What you will learn: why a recurrent state must be checkpointed at block boundaries, how a
# `PrefixStateCache` keys, matches, restores and evicts those checkpoints, what its statistics
# say on a small shared-prefix workload, and that a restored prefix decodes to exactly the same
# bits as running the whole prompt. (The concepts page "Prefix caching" explains the design.)

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixStateCache

heads, dim, size = 2, 4, 8
config = Config(
    num_recurrent_layers=2,
    max_batch_size=2,
    recurrent_state_num_heads=heads,
    recurrent_state_head_dim=dim,
    recurrent_state_size=size,
    conv_dim=heads * dim + 2 * size,
    conv_kernel=4,
    recurrent_state_dtype="float32",
    conv_state_dtype="float32",
)
model = TinyMamba2(config, vocab_size=64, seed=7)
cache = NumpyMambaCacheManager(config)
BS = 8  # tokens per block: checkpoints sit after 8, 16, 24, ... tokens
store = PrefixStateCache(cache, entries=8, block_size=BS, namespace="tiny-mamba2")
print(store)

# %% [markdown]
# ## A workload with shared system prompts
# Three system prompts of 16 or 24 tokens; each request is a system prompt plus its own question.
# Serving one request: `match` the longest cached prefix, `restore` it into the slot (or start
# from zeros), run the remaining tokens one by one, and `insert` a checkpoint at every block
# boundary passed on the way.

# %%
rng = np.random.default_rng(0)
systems = [rng.integers(0, 64, size=n) for n in (16, 24, 16)]
requests = [np.concatenate([systems[i % 3], rng.integers(0, 64, size=5)]) for i in range(9)]


def serve(tokens, slot=0):
    """Run one request in ``slot``; return the last token's output and the tokens actually run."""
    handle = store.match(tokens)
    start = 0
    if handle is None:
        cache.clear_slot(slot)
    else:
        store.restore(handle, slot)
        start = handle.length
    for i in range(start, len(tokens)):
        out = model.decode_step(cache, [tokens[i]], slots=[slot])
        if (i + 1) % BS == 0:
            store.insert(tokens[: i + 1], slot)
    return out, len(tokens) - start


ran = [serve(tokens)[1] for tokens in requests]
total = sum(len(t) for t in requests)
print(f"prompt tokens: {total}, tokens actually run: {sum(ran)}")
print(store.stats)

# %% [markdown]
# Each system prompt is run once; later requests restore its deepest checkpoint and run only
# their question. The three prompts need 7 checkpoints (after 8 and 16 tokens, and 24 for the
# longer one), which fit in 8 entries. With 4 entries the same rotation would evict each prompt's
# checkpoints before it comes round again (least recently used first) and hit nothing: the next
# cell shows it.

# %%
small = PrefixStateCache(NumpyMambaCacheManager(config), entries=4, block_size=BS)
for tokens in requests:
    small.match(tokens)
    for end in range(BS, len(tokens) + 1, BS):  # (the states do not matter for the statistics)
        small.insert(tokens[:end], 0)
print("4 entries:", small.stats)

# %% [markdown]
# ## The same bits as running the whole prompt
# Serve one more request through the store, and the same request from an empty slot in a fresh
# cache: the final state and the output agree bit for bit.

# %%
question = np.concatenate([systems[1], rng.integers(0, 64, size=3)])
out, run = serve(question, slot=1)
plain = NumpyMambaCacheManager(config)
for token in question:
    want = model.decode_step(plain, [token], slots=[1])
same = all(
    cache.get_recurrent_state(layer)[1].tobytes() == plain.get_recurrent_state(layer)[1].tobytes()
    and cache.get_conv_state(layer)[1].tobytes() == plain.get_conv_state(layer)[1].tobytes()
    for layer in range(config.num_recurrent_layers)
)
print(f"ran {run} of {len(question)} tokens; same state bits: {same}; same output: {out.tobytes() == want.tobytes()}")

# %%
assert same and out.tobytes() == want.tobytes() and run == 3
assert store.stats.hits >= 6 and sum(ran) < total // 2
