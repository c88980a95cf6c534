# %% [markdown]
# # 05 · Cross-checking backends (and your own kernels)
#
# What you will learn: how to check an implementation against the NumPy reference the way this
# project's parity tests do: the same random calls on both, every byte of every main pool
# compared after every call, untouched slots included.

# %%
from mamba_cache import select_numba_target

select_numba_target()
import numpy as np
from numba import cuda

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager

config = Config(
    num_recurrent_layers=2,
    max_batch_size=5,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=3,
    recurrent_state_size=5,
    conv_dim=7,
    conv_kernel=3,
    max_intermediate_seq_len=4,
    recurrent_state_dtype="float32",
)
ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
rng = np.random.default_rng(1)


def pools(manager):
    """Every byte of the main pools (recurrent and conv, every layer), as one uint8 array."""
    out = []
    for layer in range(config.num_recurrent_layers):
        for kind in ("recurrent", "conv"):
            main = getattr(manager, f"get_{kind}_state")(layer)
            out.append(main if isinstance(main, np.ndarray) else main.copy_to_host())
    return np.concatenate([a.reshape(-1).view(np.uint8) for a in out])


# the same random bits in both (NaN payloads included: a copy must keep them)
for layer in range(2):
    for kind in ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv"):
        target = getattr(ref, f"get_{kind}_state")(layer)
        bits = rng.integers(0, 256, size=target.nbytes, dtype=np.uint8).view(target.dtype).reshape(target.shape)
        target[...] = bits
        getattr(dev, f"get_{kind}_state")(layer).copy_to_device(bits)

# %% [markdown]
# Drive both through random reshapes and scatters, with accept lengths from padding to
# out-of-range values, and compare after each call.

# %%
checks = 0
for _ in range(12):
    active, seq = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    ref.reshape_intermediate_states(active, seq)
    dev.reshape_intermediate_states(active, seq)
    accept = rng.choice([-(2**31), -1, 0, 1, 2, 3, 4, 5, 2**31 - 1], size=active).astype(np.int32)
    ref.scatter_mtp_states(accept)
    dev.scatter_mtp_states(cuda.to_device(accept))
    assert np.array_equal(pools(ref), pools(dev)), (active, seq, accept)
    checks += 1
print(f"{checks} scatters, every byte identical")

# %% [markdown]
# The same harness checks a kernel of your own: here a row-by-row scatter written from the rule in
# the contract (docs/concepts/contract.md), against the reference.


# %%
def my_scatter(main, inter, accept, seq_len):
    for b, a in enumerate(accept):
        if 1 <= a < seq_len:
            main[b] = inter[b, a - 1]


mine = NumpyMambaCacheManager(config)
truth = NumpyMambaCacheManager(config)
for layer in range(2):
    for kind in ("recurrent", "intermediate_recurrent"):
        values = rng.standard_normal(getattr(truth, f"get_{kind}_state")(layer).shape)
        getattr(truth, f"get_{kind}_state")(layer)[...] = values
        getattr(mine, f"get_{kind}_state")(layer)[...] = values
accept = np.array([3, 0, 1, 4, 2], dtype=np.int32)
truth.scatter_mtp_states(accept)
for layer in range(2):
    my_scatter(mine.get_recurrent_state(layer), mine.get_intermediate_recurrent_state(layer), accept, 4)
agree = all(np.array_equal(mine.get_recurrent_state(i), truth.get_recurrent_state(i)) for i in range(2))
print("my scatter agrees with the reference:", agree)
assert agree
