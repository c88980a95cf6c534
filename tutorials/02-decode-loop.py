# %% [markdown]
# # 02 · A decode loop with a small Mamba2 model
#
# What you will learn: how a model reads and writes the cache in place during prefill and decode;
# how to clear the cache; how to capture one slot as a system-prompt snapshot and reuse it for a
# new request without recomputing the prompt.

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.models.mamba2 import TinyMamba2

heads, dim, state = 4, 16, 16
config = Config(
    num_recurrent_layers=4,
    max_batch_size=2,
    recurrent_state_num_heads=heads,
    recurrent_state_head_dim=dim,
    recurrent_state_size=state,
    conv_dim=heads * dim + 2 * state,
    conv_kernel=4,
    max_intermediate_seq_len=0,
    recurrent_state_dtype="float32",
)
model = TinyMamba2(config, vocab_size=100, seed=0)
cache = NumpyMambaCacheManager(config)

# %% [markdown]
# Prefill a shared system prompt in slot 0, one token at a time (the decode step updates the conv
# window and the SSM state of every layer in place), then snapshot the slot.

# %%
system_prompt = np.array([[5, 17, 42, 8, 99, 3]])
model.prefill(cache, system_prompt)
snapshot_rec = cache.capture_recurrent_states(0)
snapshot_conv = cache.capture_conv_states(0)
print(f"captured {len(snapshot_rec)} layers: recurrent {snapshot_rec[0].shape}, conv {snapshot_conv[0].shape}")

# Continue the first request in slot 0.
first = [model.decode_step(cache, [t]) for t in (7, 7, 1)]
print("request A, last output[:4]:", np.round(first[-1][0, :4], 4))

# %% [markdown]
# A new request with the same system prompt: clear the cache (all slots), restore the snapshot
# into slot 1 with `restore_slot`, and decode the same tokens there. The result is identical, bit for bit, without
# re-running the prompt.

# %%
cache.clear_states()
cache.restore_slot(1, snapshot_rec, snapshot_conv)  # every layer's recurrent and conv state, one call
second = [model.decode_step(cache, [t], slots=[1]) for t in (7, 7, 1)]
print("request B, last output[:4]:", np.round(second[-1][0, :4], 4))
print("identical:", all(np.array_equal(a, b) for a, b in zip(first, second, strict=True)))
assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
