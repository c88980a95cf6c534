"""8-bit recurrent states in the cache's pools: the example the Precision page shows (a test runs it).

    python examples/quant8_pools.py

Builds a NumPy cache with an int8 recurrent pool (float32 per-step states, stochastic rounding,
error feedback), commits one verify pass and reads the states back as float32.
"""

import numpy as np

# --8<-- [start:pools]
from mamba_cache import Config, NumpyMambaCacheManager
from mamba_cache.precision import quant8

config = Config(
    num_recurrent_layers=2,
    max_batch_size=4,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=4,
    recurrent_state_size=8,
    conv_dim=16,
    conv_kernel=4,
    max_intermediate_seq_len=3,
    recurrent_state_dtype="int8",  # the main pool: one byte an element, a float32 scale per N
    intermediate_recurrent_state_dtype="float32",  # the verify pass writes float32 steps
    conv_state_dtype="bfloat16",
    stochastic_rounding=True,
    error_feedback=True,  # keep each element's quantisation residual (bfloat16)
)
cache = NumpyMambaCacheManager(config)
# --8<-- [end:pools]


def main() -> None:
    """Write float32 verify steps, commit them into the int8 pool, and check what it reads back."""
    rng = np.random.default_rng(0)
    for layer in range(config.num_recurrent_layers):
        steps = cache.get_intermediate_recurrent_state(layer)  # [B, S, H, D, N] float32
        steps[...] = rng.standard_normal(steps.shape)
    # --8<-- [start:commit]
    accepted = np.array([2, 3, 1, 0], np.int32)  # tokens each row accepted
    positions = np.array([10, 7, 30, 2], np.int32)  # tokens each row's state had consumed before
    cache.scatter_mtp_states(accepted, positions=positions)  # quantised in the commit, with scales
    state = cache.get_recurrent_state(0)  # [B, H, D, N] int8
    scales = cache.get_recurrent_scales(0)  # [B, H, D] float32
    values = quant8.dequantise(state, scales[..., None])  # what the state reads as, float32
    # --8<-- [end:commit]
    committed = cache.get_intermediate_recurrent_state(0)[0, 1]  # row 0 accepted 2 tokens: step 1
    error = np.abs(values[0] - committed).max() / scales[0].max()
    assert state.dtype == np.int8 and values.dtype == np.float32 and error <= 1.0
    assert config.pool_bytes()["error_feedback"] == 2 * cache.get_recurrent_residual(0).nbytes
    print(f"slot 0 reads back within {error:.2f} quantisation steps of the committed float32 state")


if __name__ == "__main__":
    main()
