# %% [markdown]
# # 06 · Beyond the seed: slots, indirection, trees, planning, snapshots
#
# What you will learn: how to reset and restore single slots, commit a verify batch into
# arbitrary pool slots, commit tree-verification results, plan memory for a real model, and keep
# a system-prompt snapshot on disk.

# %%
import pathlib
import tempfile

import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.presets import PRESETS

config = Config(
    num_recurrent_layers=2,
    max_batch_size=4,
    recurrent_state_num_heads=1,
    recurrent_state_head_dim=1,
    recurrent_state_size=1,
    conv_dim=1,
    conv_kernel=1,
    max_intermediate_seq_len=3,
    recurrent_state_dtype="float32",
    conv_state_dtype="float32",
)
cache = NumpyMambaCacheManager(config)
for layer in range(2):
    cache.get_recurrent_state(layer)[:] = -1
    inter = cache.get_intermediate_recurrent_state(layer)
    inter[..., 0, 0, 0] = [[10 * (b + 1) + t for t in range(3)] for b in range(4)]
print("intermediate [row, step] (layer 0):\n", cache.get_intermediate_recurrent_state(0)[..., 0, 0, 0])

# %% [markdown]
# ## Slot indirection
# Verify rows 0..3 belong to pool slots 3, 0, 2 and 1. Row 0 accepted 2 tokens (slot 3 takes its
# step-1 state, 11) and row 1 accepted 1 (slot 0 takes its step-0 state, 20). Rows 2 and 3 accepted
# 0 tokens: both are padding, so slots 2 and 1 keep their states even though their indices point
# at live slots.

# %%
cache.scatter_mtp_states(np.array([2, 1, 0, 0], np.int32), state_indices=np.array([3, 0, 2, 1], np.int32))
print("slots after scatter:", cache.get_recurrent_state(0)[:, 0, 0, 0])
assert cache.get_recurrent_state(0)[:, 0, 0, 0].tolist() == [20.0, -1.0, -1.0, 11.0]

# %% [markdown]
# ## Tree commits
# Row 0's accepted path is nodes 0 -> 2; row 1 accepted only node 1; row 2 accepted nothing.

# %%
nodes = np.array([[0, 2], [1, -1], [-1, -1]], np.int32)
cache.scatter_accepted_tree_states(nodes, np.array([2, 1, 2], np.int32))
print("slots after tree commit:", cache.get_recurrent_state(0)[:, 0, 0, 0])
assert cache.get_recurrent_state(0)[:3, 0, 0, 0].tolist() == [12.0, 21.0, -1.0]

# %% [markdown]
# ## Clear one slot, snapshot another, restore it elsewhere

# %%
cache.clear_slot(1)
with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "system-prompt.npz"
    cache.save_slot(path, 0)
    cache.load_slot(path, 2)
print("slots after clear_slot(1), load_slot(path, 2):", cache.get_recurrent_state(0)[:, 0, 0, 0].tolist())
assert cache.get_recurrent_state(0)[:, 0, 0, 0].tolist() == [12.0, 0.0, 12.0, 11.0]

# %% [markdown]
# ## Memory planning for a real model
# Nemotron-H-8B on two GPUs, 8 sequences, MTP verify length 4: the cache one rank holds, and how
# many sequences fit in 20 GiB.

# %%
rank = PRESETS["nemotron-h-8b"].config(batch=8, mtp=4, tp=2)
print(rank.memory_table())
fits = rank.max_batch_size_for(20 * 2**30)
print("largest batch in 20 GiB per rank:", fits)
assert rank.total_bytes == 1_045_954_560 and fits == 164
