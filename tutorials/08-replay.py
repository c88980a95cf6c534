# %% [markdown]
# # 08 · Replay commit: roll speculative decoding back by recomputation
#
# What you will learn: the two ways to commit a verify pass (keep every per-step state and copy
# one, or keep each step's small inputs and recompute), what each costs in memory for real models,
# and the proof that both leave exactly the state plain decoding of the accepted tokens leaves, for
# a Mamba2 stack and a Gated DeltaNet stack.

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager, format_bytes
from mamba_cache.models.gdn import TinyGatedDeltaNet
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.presets import PRESETS

# %% [markdown]
# ## Memory: per-step states against a per-step stash
# At batch 32 and verify length 4, scatter mode keeps 4 whole states per row and layer; replay mode
# keeps, per step, only what the recurrence consumes (Mamba2: `dA`, `u = dt * x`, `B`; Gated
# DeltaNet: `g`, `beta`, `k`, `v`; both: the conv input column).

# %%
for name in ("nemotron-h-8b", "qwen3-next-80b-a3b"):
    scatter = PRESETS[name].config(batch=32, mtp=4, commit_mode="scatter").pool_bytes()
    replay = PRESETS[name].config(batch=32, mtp=4, commit_mode="replay").pool_bytes()
    per_step = scatter["intermediate_recurrent"] + scatter["intermediate_conv"]
    print(
        f"{name:<20} scatter {format_bytes(per_step):>11}   replay stash {format_bytes(replay['replay_stash']):>11}"
        f"   ratio {replay['replay_stash'] / per_step:.4f}"
    )
    assert replay["replay_stash"] * 10 <= per_step

# %% [markdown]
# The full table, both modes side by side, is what `mamba-cache plan` prints:

# %%
print(PRESETS["nemotron-h-8b"].config(batch=32, mtp=4).memory_table())


# %% [markdown]
# ## The proof, on both mixers
# The speculative cache verifies 3 drafts per row and commits the accepted prefix (scatter or
# replay); the sequential cache decodes only the accepted tokens. After every round the main pools
# must be identical, bit for bit. (A row that accepts 3 of 3 is a full accept: scatter mode finds
# it already in the pool, since its verify pass writes the pool; replay mode recomputes it.)


# %%
def tiny(mixer: str, mode: str) -> Config:
    if mixer == "gdn":  # 4 value heads on 2 key heads, key dim 8, value dim 4
        dims = dict(recurrent_state_num_heads=4, recurrent_state_head_dim=8, recurrent_state_size=4, n_groups=2)
        dims["conv_dim"] = 2 * 2 * 8 + 4 * 4
    else:
        dims = dict(recurrent_state_num_heads=2, recurrent_state_head_dim=4, recurrent_state_size=8, conv_dim=24)
    return Config(
        num_recurrent_layers=2,
        max_batch_size=4,
        conv_kernel=4,
        max_intermediate_seq_len=3,
        recurrent_state_dtype="float16",
        conv_state_dtype="float16",
        mixer=mixer,
        commit_mode=mode,
        **dims,
    )


rng = np.random.default_rng(8)
models = {"mamba2": TinyMamba2, "gdn": TinyGatedDeltaNet}
for mixer, model_class in models.items():
    for mode in ("scatter", "replay"):
        config = tiny(mixer, mode)
        model = model_class(config, vocab_size=32, seed=1)
        spec, seq = NumpyMambaCacheManager(config), NumpyMambaCacheManager(config)
        prompt = rng.integers(0, 32, size=(4, 3))
        model.prefill(spec, prompt)
        model.prefill(seq, prompt)
        for accept in ([1, 3, 2, 2], [3, 3, 1, 2]):
            drafts = rng.integers(0, 32, size=(4, 3))
            model.verify(spec, drafts)
            accept = np.array(accept, dtype=np.int32)
            if mode == "replay":
                spec.replay_mtp_states(accept)
            else:
                spec.scatter_mtp_states(accept)
            model.decode_accepted(seq, drafts, accept)
        same = all(
            spec.get_recurrent_state(i).tobytes() == seq.get_recurrent_state(i).tobytes()
            and spec.get_conv_state(i).tobytes() == seq.get_conv_state(i).tobytes()
            for i in range(config.num_recurrent_layers)
        )
        pools = config.pool_bytes()
        mtp = pools["replay_stash"] or pools["intermediate_recurrent"] + pools["intermediate_conv"]
        print(f"{mixer:<6} {mode:<7} MTP buffers {format_bytes(mtp):>10}   speculative == sequential: {same}")
        assert same

# %% [markdown]
# Why it holds: the models' decode steps call the replay commit's own step functions
# (`mamba_cache.replay.reference` in NumPy, the `@cuda.jit(device=True)` functions of
# `mamba_cache.replay.kernels` on the GPU), so replaying a stashed step is the decode step's
# arithmetic, in the same order, stored to the state dtype after every step. The replay-mode verify
# pass never writes the main pools: it advances a scratch copy of each row's state
# (`model.scratch_bytes(active)`), which an engine keeps in its verify kernel instead.

# %%
print(
    "scratch of a replay-mode verify pass of 4 rows:",
    format_bytes(TinyMamba2(tiny("mamba2", "replay")).scratch_bytes(4)),
)
assert TinyMamba2(tiny("mamba2", "replay")).scratch_bytes(4) == 2 * 4 * (2 * 4 * 8 + 24 * 4) * 2
