# %% [markdown]
# # 09 · Three ways to keep the state: scatter, replay, checkpoint
#
# What you will learn: how to run the same speculative decoding in the three commit modes, that all
# three leave the same state bits, and what each costs in bytes per accepted token
# (the concept page "Three ways to keep the state" has the equations and the real models' table).

# %%
import numpy as np

from mamba_cache import Config, NumpyMambaCacheManager, format_bytes
from mamba_cache.models.mamba2 import TinyMamba2
from mamba_cache.presets import PRESETS
from mamba_cache.traffic import best_history_len, state_traffic

# %% [markdown]
# ## One model, three caches
# A 2-layer TinyMamba2 with two groups, verify windows of up to 3 tokens, float16 states. The checkpoint
# cache has a ring of 7 steps: it folds only when another window would not fit.

# %%
SEQ, RING, ROWS, VOCAB = 3, 7, 4, 32


def tiny(mode: str) -> Config:
    return Config(
        num_recurrent_layers=2,
        max_batch_size=ROWS,
        recurrent_state_num_heads=4,
        recurrent_state_head_dim=4,
        recurrent_state_size=8,
        n_groups=2,
        conv_dim=4 * 4 + 2 * 2 * 8,
        conv_kernel=4,
        max_intermediate_seq_len=SEQ,
        recurrent_state_dtype="float16",
        conv_state_dtype="float16",
        commit_mode=mode,
        history_len=RING if mode == "checkpoint" else 0,
    )


modes = ("scatter", "replay", "checkpoint")
models = {mode: TinyMamba2(tiny(mode), vocab_size=VOCAB, seed=9) for mode in modes}
caches = {mode: NumpyMambaCacheManager(tiny(mode)) for mode in modes}
commits = {
    "scatter": caches["scatter"].scatter_mtp_states,
    "replay": caches["replay"].replay_mtp_states,
    "checkpoint": caches["checkpoint"].checkpoint_mtp_states,
}

# %% [markdown]
# ## The same windows through each
# Each round verifies 3 drafts per row and accepts a random prefix of 1..3 tokens. The verify pass is
# the model's: in scatter mode it writes the per-step states, in replay mode the stash, in checkpoint
# mode ring steps `h .. h + V - 1`, reading each step's state from the checkpoint and the ring
# (`mamba_cache.checkpoint.reference.state_after`).

# %%
rng = np.random.default_rng(9)
prompt = rng.integers(0, VOCAB, size=(ROWS, 4))
for mode in modes:
    models[mode].prefill(caches[mode], prompt)
caches["checkpoint"].materialize(np.arange(ROWS, dtype=np.int32))  # fold what the prefill left in the ring: h = 0
accepted, folds = [], 0
for _ in range(12):
    drafts = rng.integers(0, VOCAB, size=(ROWS, SEQ))
    accept = rng.integers(1, SEQ + 1, ROWS).astype(np.int32)
    for mode in modes:
        models[mode].verify(caches[mode], drafts)
    p0 = caches["checkpoint"].checkpoint_positions()
    for mode in modes:
        commits[mode](accept)
    folds += int((caches["checkpoint"].checkpoint_positions() != p0).sum())
    accepted += accept.tolist()

# %% [markdown]
# ## Same bits
# The checkpoint cache's main pools hold the checkpoints; its current state (checkpoint folded with
# the ring, `current_state`) is what the other two hold in their pools.

# %%
same = True
for slot in range(ROWS):
    recurrent, conv = caches["checkpoint"].current_state(slot)
    for layer in range(2):
        for mode in ("scatter", "replay"):
            same &= recurrent[layer].tobytes() == caches[mode].get_recurrent_state(layer)[slot : slot + 1].tobytes()
            same &= conv[layer].tobytes() == caches[mode].get_conv_state(layer)[slot : slot + 1].tobytes()
print(f"{len(accepted)} row commits, {sum(accepted)} tokens accepted, {folds} folds in checkpoint mode")
print("states equal in all three modes:", same)
assert same and 0 < folds < len(accepted)

# %% [markdown]
# ## What each moved
# `mamba_cache.traffic.state_traffic` counts the state path's bytes for the accept lengths slot 0 just
# went through (all layers); summed over the slots, its fold count is the one we just observed.

# %%
for mode in modes:
    run = state_traffic(tiny(mode), mode, accepted[0::ROWS], history_len=RING if mode == "checkpoint" else None)
    print(f"{mode:<10} {format_bytes(round(run.bytes_per_token)):>10} per accepted token, {run.folds:>2} state writes")
modelled = sum(state_traffic(tiny("checkpoint"), "checkpoint", accepted[s::ROWS]).folds for s in range(ROWS))
print(f"folds the model counts over all {ROWS} slots: {modelled} (observed: {folds})")
assert modelled == folds

# %% [markdown]
# At these toy sizes a step's inputs are not much smaller than the state, so the ring saves little. At
# a real model's sizes the state is about 50 times a step, and the ring wins (V = 4, accept lengths
# uniform on 1..4):

# %%
config = PRESETS["nemotron-h-8b"].config(batch=32, mtp=4)
run = rng.integers(1, 5, 1000)
scatter = state_traffic(config, "scatter", run)
for label, traffic in (
    ("scatter", scatter),
    ("replay", state_traffic(config, "replay", run)),
    ("checkpoint", best := best_history_len(config, run)),
):
    ratio = traffic.bytes_per_token / scatter.bytes_per_token
    print(f"{label:<10} {format_bytes(round(traffic.bytes_per_token)):>10} per token ({ratio:.2f} x scatter)")
print(f"best ring: R = {best.history_len} steps, {format_bytes(best.slot_bytes)} per slot")
assert best.bytes_per_token < 0.35 * scatter.bytes_per_token
