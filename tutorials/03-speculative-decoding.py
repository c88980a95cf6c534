# %% [markdown]
# # 03 · Speculative decoding with intermediate states, reshape and scatter
#
# What you will learn: what the MTP verify pass writes into the intermediate buffers, why
# `reshape_intermediate_states` is a reinterpretation and not a slice, the exact rule of
# `scatter_mtp_states`, and a check that verify + scatter leaves exactly the state that plain
# decoding of the accepted tokens leaves.

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
