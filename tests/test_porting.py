"""The porting guide (docs/concepts/porting.md), checked row by row.

Each test writes a peer engine's commit rule as a small NumPy function (as that engine's code
defines it), translates the peer's inputs with the recipe the guide gives, runs the translated
inputs through ``NumpyMambaCacheManager`` and checks that the pools hold, bit for bit, what the
peer's own rule expects. The recipes below are the ones the guide quotes.
"""

import numpy as np
import pytest
from helpers import fill_random, small_config
from numpy.lib.stride_tricks import sliding_window_view

from mamba_cache import NumpyMambaCacheManager

B, V = 5, 4  # small_config: max_batch_size 5, max_intermediate_seq_len 4


# ---------------------------------------------------------------- the recipes (quoted in the guide)
def from_vllm(num_accepted, block_ids, null_block=0):
    """vLLM: padding rows use the null block; an accept of 0 commits step 0."""
    pad = block_ids == null_block
    accept = np.where(pad, 0, np.maximum(num_accepted, 1)).astype(np.int32)
    indices = np.where(pad, -1, block_ids).astype(np.int32)
    return accept, indices


def from_trtllm(num_accepted, slots, dummy_slot):
    """TRT-LLM: every padding row points at one shared dummy slot."""
    pad = slots == dummy_slot
    accept = np.where(pad, 0, num_accepted).astype(np.int32)
    indices = np.where(pad, -1, slots).astype(np.int32)
    return accept, indices


def from_int64(slots, max_batch_size):
    """int64 slots: range-check, then narrow (astype would wrap 2**32 + 1 to 1)."""
    in_range = (slots >= 0) & (slots < max_batch_size)
    return np.where(in_range, slots, -1).astype(np.int32)


def per_step_conv_windows(row_windows, width, verify_len):
    """Row windows [active, C, width + V] -> per-step [active, V, C, width]."""
    windows = sliding_window_view(row_windows, width, axis=2)  # [active, C, V+1, width]
    steps = windows[:, :, 1 : verify_len + 1]  # the window after each step
    return np.ascontiguousarray(steps.transpose(0, 2, 1, 3))


# ---------------------------------------------------------------- helpers
def make_cache(rng, active=B, **overrides):
    cache = NumpyMambaCacheManager(small_config(**overrides))
    fill_random([cache], rng)
    cache.reshape_intermediate_states(active, V)
    return cache


def main_pools(cache):
    return [(cache.get_recurrent_state(i).copy(), cache.get_conv_state(i).copy()) for i in range(cache.num_layers())]


def inter_pools(cache):
    return [
        (cache.get_intermediate_recurrent_state(i).copy(), cache.get_intermediate_conv_state(i).copy())
        for i in range(cache.num_layers())
    ]


def apply_peer(cache, commits):
    """What a peer's commit leaves: ``main[slot] = intermediate[row, step]`` for each (row, slot, step)."""
    expected = main_pools(cache)
    for (rec, conv), (irec, iconv) in zip(expected, inter_pools(cache), strict=True):
        for row, slot, step in commits:
            rec[slot], conv[slot] = irec[row, step], iconv[row, step]
    return expected


def assert_pools_equal(got, expected, slots=range(B)):
    for layer, ((rec, conv), (erec, econv)) in enumerate(zip(got, expected, strict=True)):
        for slot in slots:
            assert rec[slot].tobytes() == erec[slot].tobytes(), (layer, slot, "recurrent")
            assert conv[slot].tobytes() == econv[slot].tobytes(), (layer, slot, "conv")


# ---------------------------------------------------------------- the peers' rules
def peer_full_accept(num_accepted, slots, verify_len):
    """vLLM, SGLang, TRT-LLM: the verify pass leaves the main state alone; 1 <= a <= V commits step a-1."""
    return [(b, s, a - 1) for b, (a, s) in enumerate(zip(num_accepted, slots, strict=True)) if 1 <= a <= verify_len]


def peer_vllm(num_accepted, block_ids, verify_len):
    """vLLM (vllm/v1/worker/mamba_utils.py): step max(a-1, 0), every row, padding rows into block 0."""
    return [(b, s, max(a - 1, 0)) for b, (a, s) in enumerate(zip(num_accepted, block_ids, strict=True))]


# ---------------------------------------------------------------- one test per row of the guide
def test_full_accept_commits_step_v_minus_1_with_verify_writes_main_pool_false(rng):
    accept = np.array([4, 1, 3, 0, 4], dtype=np.int32)  # two full accepts, one padding row
    ours = make_cache(rng, verify_writes_main_pool=False)
    expected = apply_peer(ours, peer_full_accept(accept, range(B), V))
    before = main_pools(ours)
    ours.scatter_mtp_states(accept)
    assert_pools_equal(main_pools(ours), expected)
    # the full accepts were committed (the seed's default, verify_writes_main_pool=True, would skip them)
    assert main_pools(ours)[0][0][0].tobytes() != before[0][0][0].tobytes()
    assert main_pools(ours)[0][0][4].tobytes() != before[0][0][4].tobytes()


def test_vllm_accept_zero_commits_step_zero(rng):
    block_ids = np.array([1, 2, 3, 4], dtype=np.int64)  # no padding rows here
    accept = np.array([0, 2, 0, 4], dtype=np.int32)
    ours = make_cache(rng, active=4, verify_writes_main_pool=False)
    expected = apply_peer(ours, peer_vllm(accept, block_ids, V))
    translated, indices = from_vllm(accept, block_ids)
    assert translated.tolist() == [1, 2, 1, 4]
    ours.scatter_mtp_states(translated, state_indices=indices)
    assert_pools_equal(main_pools(ours), expected)


def test_vllm_padding_rows_point_at_slot_zero(rng):
    block_ids = np.array([3, 0, 1, 0, 4], dtype=np.int64)  # rows 1 and 3 are padding (the null block)
    accept = np.array([2, 3, 4, 1, 1], dtype=np.int32)
    ours = make_cache(rng, verify_writes_main_pool=False)
    before = main_pools(ours)
    expected = apply_peer(ours, peer_vllm(accept, block_ids, V))
    accept32, indices = from_vllm(accept, block_ids)
    ours.scatter_mtp_states(accept32, state_indices=indices)
    # vLLM's block 0 receives garbage nobody reads; in ours slot 0 is live, and stays untouched
    assert_pools_equal(main_pools(ours), expected, slots=range(1, B))
    assert_pools_equal(main_pools(ours), before, slots=[0, 2])


def test_trtllm_shared_dummy_slot(rng):
    dummy = 4
    slots = np.array([2, dummy, 0, dummy], dtype=np.int32)  # rows 1 and 3 are padding
    accept = np.array([3, 2, 4, 1], dtype=np.int32)
    ours = make_cache(rng, active=4, verify_writes_main_pool=False)
    before = main_pools(ours)
    with pytest.raises(ValueError, match="distinct"):  # untranslated: two rows commit into one slot
        ours.scatter_mtp_states(accept, state_indices=slots)
    assert_pools_equal(main_pools(ours), before)  # refused before touching anything
    expected = apply_peer(ours, peer_full_accept(accept, slots, V))  # the dummy's winner is unspecified
    accept32, indices = from_trtllm(accept, slots, dummy)
    ours.scatter_mtp_states(accept32, state_indices=indices)
    assert_pools_equal(main_pools(ours), expected, slots=[0, 1, 2, 3])
    assert_pools_equal(main_pools(ours), before, slots=[dummy, 1, 3])


def test_int64_slot_indices(rng):
    slots = np.array([2**32 + 1, 3, -1, 0, 2**31], dtype=np.int64)  # 2**32 + 1 would wrap to slot 1
    accept = np.array([2, 4, 3, 1, 2], dtype=np.int32)
    ours = make_cache(rng, verify_writes_main_pool=False)
    with pytest.raises(TypeError, match="int32"):
        ours.scatter_mtp_states(accept, state_indices=slots)
    in_range = [(b, int(s), a - 1) for b, (a, s) in enumerate(zip(accept, slots, strict=True)) if 0 <= s < B]
    expected = apply_peer(ours, in_range)
    indices = from_int64(slots, B)
    assert indices.tolist() == [-1, 3, -1, 0, -1]
    ours.scatter_mtp_states(accept, state_indices=indices)
    assert_pools_equal(main_pools(ours), expected)


def test_per_step_conv_windows_from_one_shifted_row_window(rng):
    ours = make_cache(rng, verify_writes_main_pool=False)
    width, channels = ours.get_config().conv_kernel, ours.get_config().conv_dim
    accept = np.array([1, 0, 4, 2, 3], dtype=np.int32)
    expected = []
    for layer in range(ours.num_layers()):
        conv = ours.get_conv_state(layer)
        # the peer's row window: the current window, then the V input columns of the verify pass
        new_columns = rng.standard_normal((B, channels, V)).astype(conv.dtype)
        row_windows = np.concatenate([conv, new_columns], axis=2)  # [B, C, K + V]
        # the peer: after a accepted tokens the window starts a columns later (a = 0: unchanged)
        expected.append(np.stack([row_windows[b, :, a : a + width] for b, a in enumerate(accept)]))
        ours.get_intermediate_conv_state(layer)[...] = per_step_conv_windows(row_windows, width, V)
    ours.scatter_mtp_states(accept)
    for layer in range(ours.num_layers()):
        assert ours.get_conv_state(layer).tobytes() == expected[layer].tobytes(), layer


@pytest.mark.parametrize(
    "recipe", [from_vllm, from_trtllm, from_int64, per_step_conv_windows], ids=lambda f: f.__name__
)
def test_the_guide_quotes_the_tested_recipes(recipe):
    import inspect
    import pathlib

    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs/concepts/porting.md").read_text(encoding="utf-8")
    assert inspect.getsource(recipe) in guide, f"docs/concepts/porting.md must quote {recipe.__name__} as tested here"


@pytest.mark.parametrize(
    "recipe", [from_vllm, from_trtllm, from_int64, per_step_conv_windows], ids=lambda f: f.__name__
)
def test_each_python_block_of_the_guide_runs_on_its_own(recipe):
    """A reader copies one block: it must carry its imports (a missing one is a NameError when called)."""
    import pathlib
    import re

    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs/concepts/porting.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if f"def {recipe.__name__}(" in b]
    assert len(blocks) == 1, recipe.__name__
    namespace = {}
    exec(blocks[0], namespace)  # a fresh namespace: only what the block imports
    quoted = namespace[recipe.__name__]
    args = {
        "from_vllm": (np.array([0, 3, 2]), np.array([4, 0, 2])),
        "from_trtllm": (np.array([1, 3, 2]), np.array([7, 1, 7]), 7),
        "from_int64": (np.array([-1, 2, 2**32 + 1], dtype=np.int64), B),
        "per_step_conv_windows": (np.arange(2 * 3 * (4 + V), dtype=np.float32).reshape(2, 3, 4 + V), 4, V),
    }[recipe.__name__]
    for got, want in zip(np.atleast_1d(quoted(*args)), np.atleast_1d(recipe(*args)), strict=True):
        assert np.array_equal(got, want), recipe.__name__
