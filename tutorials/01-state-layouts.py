# %% [markdown]
# # 01 · State layouts and memory
#
# What you will learn: which tensors a `MambaCacheManager` owns for each recurrent layer, their
# shapes and dtypes, how much memory they take, and that every layer tensor is a view of one
# allocation per state kind.

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager

# A Mamba2-130M-sized cache: 24 layers, d_inner 1536 = 24 heads x 64, state size 128,
# conv over x, B and C (1536 + 2 * 128 = 1792 channels), kernel 4; 8 slots, MTP verify of 3.
config = Config(
    num_recurrent_layers=24,
    max_batch_size=8,
    recurrent_state_num_heads=24,
    recurrent_state_head_dim=64,
    recurrent_state_size=128,
    conv_dim=1792,
    conv_kernel=4,
    max_intermediate_seq_len=3,
)
print(config.memory_table())

# %% [markdown]
# Per layer: a recurrent (SSM) state `[B, H, D, N]`, a conv state `[B, conv_dim, conv_kernel]`,
# and, because `max_intermediate_seq_len > 0`, the MTP intermediate states `[B, S, ...]`.

# %%
cache = NumpyMambaCacheManager(config)
for name in ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv"):
    view = getattr(cache, f"get_{name}_state")(0)
    print(f"layer 0 {name:<24} shape {list(view.shape)!s:<22} dtype {view.dtype}")

# %% [markdown]
# Each state kind is one allocation holding every layer; `get_recurrent_state(i)` is a view of
# layer `i` of it, so writing through the view writes the cache. Everything starts at zero.

# %%
layer3 = cache.get_recurrent_state(3)
print("layers 3 and 4 view one allocation:", layer3.base is cache.get_recurrent_state(4).base)
print("that allocation's shape:", layer3.base.shape)
layer3[2] = 1.0
print("slot 2 of layer 3 now sums to", float(cache.get_recurrent_state(3)[2].sum(dtype=np.float64)))
print("every other slot still zero:", not cache.get_recurrent_state(3)[[0, 1, 3]].any())

bytes_per_slot = config.recurrent_slot_elems * 2 + config.conv_slot_elems * 2
print(f"one sequence costs {bytes_per_slot * config.num_recurrent_layers / 2**20:.2f} MiB of main state")
assert cache.get_recurrent_state(3)[2].sum(dtype=np.float64) == 24 * 64 * 128
assert layer3.base is cache.get_recurrent_state(0).base
assert config.total_bytes == sum(config.pool_bytes().values())
