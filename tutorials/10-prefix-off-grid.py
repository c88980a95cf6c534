# %% [markdown]
# # 10 · Prefix caching off the block grid: a chat whose second turn hits
#
# What you will learn: why a chat's next turn misses a store that checkpoints only at block
# boundaries, how a placement (`end_of_request`) asks the store where to checkpoint instead, how
# the store keys a checkpoint that is not a multiple of the block size, and that the restored
# state decodes to exactly the bits of running the whole conversation. (The concepts page "Prefix
# caching" has the design and a measured workload.)

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.prefix import PrefixStateCache, prefix_key

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
VOCAB, BS = 64, 16
model = TinyMamba2(config, vocab_size=VOCAB, seed=7)


def sample(out):
    """A toy sampler: the next token from the layer stack's output (the tiny model has no LM head)."""
    return int(np.argmax(out[0])) % VOCAB


def turn(cache, store, tokens, prompt_length, reply_length, slot=0):
    """Serve one chat turn: match, restore, prefill the rest, sample a reply, checkpoint where told.

    Returns the request's tokens (prompt and reply) and how many prompt tokens were actually run.
    """
    prompt = tokens[:prompt_length]
    handle = store.match(prompt)
    start = 0
    if handle is None:
        cache.clear_slot(slot)
    else:
        store.restore(handle, slot)
        start = handle.length
    for token in prompt[start:]:
        out = model.decode_step(cache, [token], slots=[slot])
    reply = [sample(out)]
    for _ in range(reply_length - 1):  # each sampled token runs to sample the next ...
        reply.append(sample(model.decode_step(cache, [reply[-1]], slots=[slot])))
    request = np.concatenate([prompt, reply])  # ... but the last one has not run: the store knows
    for spot in store.positions(request, prompt_length=prompt_length, start=start):
        store.insert(request[: spot.length], slot, kind=spot.kind)
    return request, len(prompt) - start


# %% [markdown]
# ## The grid misses
# Block size 16, as a serving engine would pick for its attention blocks (vLLM users report 528 and
# more for hybrid models). Turn 1: an 11-token prompt and a 4-token reply. The state after turn 1
# has consumed 14 tokens: no multiple of 16 was ever passed, so a store that checkpoints only at
# block boundaries holds nothing, and turn 2 (turn 1, the reply and 6 new tokens) runs from zero.

# %%
rng = np.random.default_rng(0)
user1, user2 = rng.integers(0, VOCAB, size=11), rng.integers(0, VOCAB, size=6)

grid_cache = NumpyMambaCacheManager(config)
grid = PrefixStateCache(grid_cache, entries=4, block_size=BS)  # placement "every_block": the default
first, _ = turn(grid_cache, grid, user1, 11, 4)
second = np.concatenate([first, user2])
_, ran = turn(grid_cache, grid, second, len(second), 3)
print(f"grid store: turn 2 ran {ran} of {len(second)} prompt tokens; {grid.stats}")

# %% [markdown]
# ## A checkpoint at the end of the request
# The same chat with placement `end_of_request`: after turn 1 the store names position 14 (the
# tokens the state consumed) and the engine inserts the slot's state there. 14 = 0 x 16 + 14, so
# its key is a tail key: BLAKE2b of the namespace's digest `d_0` followed by the 14 tokens,
# personalised with `b"tail"`. Turn 2 matches it: one block digest per whole block of its prompt,
# plus one tail digest per off-grid length registered under those digests.

# %%
chat_cache = NumpyMambaCacheManager(config)
store = PrefixStateCache(chat_cache, entries=4, block_size=BS, placement="end_of_request")
first, _ = turn(chat_cache, store, user1, 11, 4)
print("store.positions of turn 1:", store.positions(first, prompt_length=11))
print("its key:", prefix_key(first[:14], BS).hex())
second = np.concatenate([first, user2])
handle = store.match(second)
print("turn 2 matches:", handle)
_, ran = turn(chat_cache, store, second, len(second), 3, slot=1)
print(f"off-grid store: turn 2 ran {ran} of {len(second)} prompt tokens; {store.stats}")

# %% [markdown]
# ## The same bits as running the whole conversation
# Restore the checkpoint once more into slot 1 and run the rest of turn 2's prompt; run the whole
# prompt from an empty slot in a fresh cache: the states agree bit for bit (the store holds exactly
# the state after its 14 tokens).

# %%
hit = store.match(second)
store.restore(hit, slot=1)
for token in second[hit.length :]:
    model.decode_step(chat_cache, [token], slots=[1])
plain = NumpyMambaCacheManager(config)
for token in second:
    model.decode_step(plain, [token], slots=[1])
same = all(
    chat_cache.get_recurrent_state(layer)[1].tobytes() == plain.get_recurrent_state(layer)[1].tobytes()
    and chat_cache.get_conv_state(layer)[1].tobytes() == plain.get_conv_state(layer)[1].tobytes()
    for layer in range(config.num_recurrent_layers)
)
print(f"restored {hit.length} tokens, ran {len(second) - hit.length}; same state bits as the whole prompt: {same}")

# %%
assert (
    grid.stats.hits == 0 and handle.length == hit.length == 14 and store.stats.offgrid_hits == 3
)  # three matches of turn 2
assert same and ran == len(second) - 14
