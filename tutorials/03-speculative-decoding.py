# %% [markdown]
# # 03 · Speculative decoding with intermediate states, reshape and scatter
#
# What you will learn: what the MTP verify pass writes into the intermediate buffers, why
# `reshape_intermediate_states` is a reinterpretation and not a slice, the exact rule of
# `scatter_mtp_states`, a check that verify + scatter leaves exactly the state that plain
# decoding of the accepted tokens leaves, and finally a whole speculative decoding loop: a draft
# model proposes, the target verifies in one pass, greedy acceptance with a bonus token, both
# caches roll back, and the output equals plain greedy decoding token for token.

# %% [markdown]
# ## A worked example with numbers
# One layer, 3 slots, a "state" of one element, verify length 3. We write into the intermediate
# buffer the value `10 * (row + 1) + step`, so every entry says where it came from.

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager

tiny = Config(
    num_recurrent_layers=1,
    max_batch_size=3,
    recurrent_state_num_heads=1,
    recurrent_state_head_dim=1,
    recurrent_state_size=1,
    conv_dim=1,
    conv_kernel=1,
    max_intermediate_seq_len=3,
    recurrent_state_dtype="float32",
    conv_state_dtype="float32",
)
cache = NumpyMambaCacheManager(tiny)
cache.get_recurrent_state(0)[:] = -1  # the state each row had before verify
cache.reshape_intermediate_states(3, 3)  # 3 active rows x V = 3 draft tokens
inter = cache.get_intermediate_recurrent_state(0)
for row in range(3):
    for step in range(3):
        inter[row, step] = 10 * (row + 1) + step
print("intermediate [row, step]:\n", inter[:, :, 0, 0, 0])

accept = np.array([2, 3, 0], dtype=np.int32)  # row 0: 2 tokens, row 1: all 3, row 2: padding
cache.scatter_mtp_states(accept)
print("main state after scatter:", cache.get_recurrent_state(0)[:, 0, 0, 0])

# %% [markdown]
# Row 0 accepted 2 tokens, so it gets step 1 (value 11). Row 1 accepted all 3: the verify pass
# already left its final state in the main pool, so nothing is copied (-1 stays, standing in for
# that final state). Row 2 is padding and untouched.

# %%
assert cache.get_recurrent_state(0)[:, 0, 0, 0].tolist() == [11.0, -1.0, -1.0]

# %% [markdown]
# ## Reshape reinterprets the start of the buffer
# The verify pass writes `[active, V, ...]` contiguously from the start of the buffer. With
# `V = 2 < S = 3`, element `[1, 0]` of the reshaped view is element 2 of the buffer: `[0, 2]` of
# the full-size view.

# %%
cache.reshape_intermediate_states(3, 3)
full = cache.get_intermediate_recurrent_state(0)[:, :, 0, 0, 0].copy()
cache.reshape_intermediate_states(2, 2)
short = cache.get_intermediate_recurrent_state(0)[:, :, 0, 0, 0]
print("full-size view:\n", full, "\nreshaped [2, 2] view:\n", short)
assert short[1, 0] == full[0, 2]

# %% [markdown]
# ## Verify + scatter equals sequential decoding
# Two caches, one small Mamba2 model. One runs the verify pass over 3 draft tokens per row and
# commits with `scatter_mtp_states`; the other decodes only the accepted tokens one by one.

# %%
from mamba_cache.models.mamba2 import TinyMamba2

config = Config(
    num_recurrent_layers=2,
    max_batch_size=4,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=8,
    recurrent_state_size=8,
    conv_dim=2 * 8 + 2 * 8,
    conv_kernel=4,
    max_intermediate_seq_len=3,
)
model = TinyMamba2(config, vocab_size=50, seed=3)
spec, seq = NumpyMambaCacheManager(config), NumpyMambaCacheManager(config)
rng = np.random.default_rng(0)
prompt = rng.integers(0, 50, size=(4, 5))
model.prefill(spec, prompt)
model.prefill(seq, prompt)
for round_ in range(4):
    drafts = rng.integers(0, 50, size=(4, 3))
    accept = rng.integers(1, 4, size=4).astype(np.int32)
    model.verify(spec, drafts)
    spec.scatter_mtp_states(accept)
    model.decode_accepted(seq, drafts, accept)  # row b decodes drafts[b, :accept[b]] one by one
    print(f"round {round_}: accept_lengths {accept.tolist()}")

same = all(
    np.array_equal(spec.get_recurrent_state(i), seq.get_recurrent_state(i))
    and np.array_equal(spec.get_conv_state(i), seq.get_conv_state(i))
    for i in range(config.num_recurrent_layers)
)
print("speculative == sequential, bit for bit:", same)
assert same

# %% [markdown]
# ## A whole speculative decoding loop, with a draft model
# Now the real thing. A **draft** model (cheap, a little wrong) proposes `V` tokens greedily; the
# **target** model checks all of them in one verify pass; greedy acceptance keeps the drafts that
# match the target's own choice, plus one **bonus** token from the target; the scatter commits the
# target's state after the last kept token, and the draft's cache rolls back the same way. The
# output must be exactly what plain greedy decoding of the target produces.
#
# The target is a `TinyMamba2`; the draft is a perturbed copy (same config, every weight scaled by
# `1 + small noise`) with its own cache. Both share one output head (as MTP heads and EAGLE drafts
# share the target's), so logits are `hidden @ lm_head`.

# %%
V = 3  # draft tokens per round
W = V + 1  # the verify window: the pending token, then the V drafts
VOCAB, ROWS, NEW_TOKENS = 40, 3, 24

spec_config = Config(
    num_recurrent_layers=2,
    max_batch_size=ROWS,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=8,
    recurrent_state_size=8,
    conv_dim=2 * 8 + 2 * 8,
    conv_kernel=4,
    max_intermediate_seq_len=W,
    recurrent_state_dtype="float32",
    conv_state_dtype="float32",
)
target = TinyMamba2(spec_config, vocab_size=VOCAB, seed=11)
draft = TinyMamba2(spec_config, vocab_size=VOCAB, seed=11)
noise = np.random.default_rng(1)
for weight in draft.weights.values():  # every array of the draft: the target's, slightly off
    weight *= 1 + np.float32(0.1) * noise.standard_normal(weight.shape).astype(np.float32)
width = spec_config.recurrent_state_num_heads * spec_config.recurrent_state_head_dim
lm_head = (np.random.default_rng(2).standard_normal((width, VOCAB)) / np.sqrt(width)).astype(np.float32)


def greedy(hidden):
    """``[n, M]`` hidden states -> ``[n]`` greedy next tokens."""
    return np.argmax(hidden @ lm_head, axis=1)


prompts = np.random.default_rng(3).integers(0, VOCAB, size=(ROWS, 6))

# %% [markdown]
# **The reference: plain greedy decoding of the target**, one token per step. Convention used all
# along: a cache has consumed every token except the last one produced (the *pending* token), so
# the prefill runs `prompt[:, :-1]` and the next step feeds `prompt[:, -1]`.

# %%
plain_cache = NumpyMambaCacheManager(spec_config)
target.prefill(plain_cache, prompts[:, :-1])
pending = prompts[:, -1]
plain = []
for _ in range(NEW_TOKENS):
    pending = greedy(target.decode_step(plain_cache, pending))
    plain.append(pending)
plain = np.stack(plain, axis=1)  # [ROWS, NEW_TOKENS]
print("plain greedy, row 0:", plain[0].tolist())

# %% [markdown]
# **The speculative loop.** Each round, for all rows at once:
#
# 1. *Draft*: the draft feeds the pending token and then its own guesses, `W = V + 1` steps, each
#    step writing its state into the draft cache's per-step buffers (the last step only consumes
#    `d_V`, so that a full accept leaves the draft in step with the target).
# 2. *Verify*: the target runs the window `[pending, d_1 .. d_V]` in one pass, writing the state
#    after each window token to its per-step buffers and leaving the state after all `W` in the
#    main pool; `g[t]` is the target's greedy token after window token `t`.
# 3. *Accept*: `j` = the number of leading drafts with `d_t == g[t-1]`. The row emits
#    `g[0] .. g[j]` (the `j` accepted drafts, which equal the target's choices, plus the bonus
#    `g[j]`). It keeps the states of `a = j + 1` window tokens.
# 4. *Commit*: `scatter_mtp_states(a)` on **both** caches: the state after window token `a - 1`
#    becomes the slot's state (for `a = W` the verify pass already left it there), and `g[j]` is
#    the new pending token.

# %%
target_cache, draft_cache = NumpyMambaCacheManager(spec_config), NumpyMambaCacheManager(spec_config)
target.prefill(target_cache, prompts[:, :-1])
draft.prefill(draft_cache, prompts[:, :-1])
pending = prompts[:, -1]
generated = [[] for _ in range(ROWS)]
proposed = accepted = rounds = 0
while min(len(tokens) for tokens in generated) < NEW_TOKENS:
    # 1. draft: W steps, per-step states into the draft cache
    draft_cache.reshape_intermediate_states(ROWS, W)
    window = np.empty((ROWS, W), dtype=np.int64)
    window[:, 0] = pending
    for t in range(W):
        guess = greedy(draft.decode_step(draft_cache, window[:, t], step=t))
        if t < V:
            window[:, t + 1] = guess
    # 2. verify: one pass of the target over the window
    target_cache.reshape_intermediate_states(ROWS, W)
    g = np.stack([greedy(target.decode_step(target_cache, window[:, t], step=t)) for t in range(W)], axis=1)
    # 3. greedy acceptance, with the bonus token
    matches = window[:, 1:] == g[:, :V]  # [ROWS, V]: draft t+1 equals the target's choice
    j = np.where(matches.all(axis=1), V, np.argmin(matches, axis=1))  # leading matches per row
    for row in range(ROWS):
        generated[row].extend(g[row, : j[row] + 1].tolist())
    # 4. commit: both caches keep the state after window token j
    accept_lengths = (j + 1).astype(np.int32)
    target_cache.scatter_mtp_states(accept_lengths)
    draft_cache.scatter_mtp_states(accept_lengths)
    pending = g[np.arange(ROWS), j]
    proposed, accepted, rounds = proposed + ROWS * V, accepted + int(j.sum()), rounds + 1
    if rounds <= 3:
        print(f"round {rounds}: drafts {window[:, 1:].tolist()}, target {g[:, :V].tolist()}, accepted {j.tolist()}")

speculative = np.array([tokens[:NEW_TOKENS] for tokens in generated])
print(f"acceptance rate: {accepted}/{proposed} = {accepted / proposed:.0%} of the drafts")
per_pass = sum(len(tokens) for tokens in generated) / (ROWS * rounds)
print(f"{rounds} target passes, {per_pass:.2f} tokens per row per pass (plain decoding: 1 per pass)")
print("speculative, row 0:", speculative[0].tolist())
print("speculative tokens == plain greedy tokens:", np.array_equal(speculative, plain))

# %% [markdown]
# Every emitted token is one the target itself chose (an accepted draft equals the target's greedy
# token; the bonus is the target's), and every round starts from exactly the state plain decoding
# would have, so the two token streams are identical, token for token, whatever the draft
# proposes. A better draft only changes how many tokens each target pass yields.

#
# The caches tell the same story. Each row's slot, in both caches, must hold exactly the state
# left by feeding that model, one token at a time, everything the row has emitted except the new
# pending token: the target's rollback is the scatter, and so is the draft's.


# %%
def same_state(a, b):
    return all(
        np.array_equal(a.get_recurrent_state(i), b.get_recurrent_state(i))
        and np.array_equal(a.get_conv_state(i), b.get_conv_state(i))
        for i in range(spec_config.num_recurrent_layers)
    )


for model_, cache_ in ((target, target_cache), (draft, draft_cache)):
    replayed = NumpyMambaCacheManager(spec_config)
    model_.prefill(replayed, prompts[:, :-1])
    for row in range(ROWS):
        for token in [prompts[row, -1], *generated[row][:-1]]:
            model_.decode_step(replayed, [token], slots=[row])
    assert same_state(cache_, replayed)
print("target and draft caches == plain decoding of the emitted tokens, bit for bit: True")

assert 0 < accepted < proposed, "the example is meant to accept some drafts and reject others"
assert np.array_equal(speculative, plain)
