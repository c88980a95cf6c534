"""Parity: both backends driven through the same random sequence of calls stay bit-identical.

Every pool is compared whole (every layer, every slot, the intermediate buffers too) after every
call, so a kernel that writes one word too many or skips a word fails here. Data are random bit
patterns from the session's seed (fixed by default and printed; ``MAMBA_CACHE_SEED=random`` draws
a fresh one, ``MAMBA_CACHE_SEED=<n>`` replays one).
"""

import numpy as np
import pytest
from helpers import (
    ON_GPU,
    assert_same_bits,
    fill_random,
    random_bits,
    small_config,
    snapshot,
    to_host,
)

from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager
from mamba_cache.core.kernels import MAX_THREADS, WORDS_PER_THREAD

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
KINDS = ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv")


def edge_configs():
    """Slots whose word count sits on and just off a chunk edge, and each word width."""
    full_chunk = MAX_THREADS * WORDS_PER_THREAD  # words one block covers at full size
    cases = {
        # fp32 recurrent: H*D*N elements = 2 * words
        "one-warp-chunk": (1, 16, 16),  # 256 elems -> 128 words = 32 threads x 4: on the edge
        "one-warp-chunk+1": (2, 3, 43),  # 258 elems -> 129 words
        "one-warp-chunk-1": (2, 127, 1),  # 254 elems -> 127 words
    }
    if ON_GPU:  # full-size blocks are too slow for the simulator
        cases.update(
            {
                "full-chunk": (2, 32, full_chunk // 32),  # 2048 elems -> 1024 words
                "full-chunk+1": (2, 5, 205),  # 2050 elems -> 1025 words
                "two-chunks+1": (2, 1, 2 * full_chunk + 1),  # 4098 elems -> 2049 words
            }
        )
    for name, (h, d, n) in cases.items():
        yield pytest.param(
            small_config(
                recurrent_state_num_heads=h,
                recurrent_state_head_dim=d,
                recurrent_state_size=n,
                recurrent_state_dtype="float32",
            ),
            id=name,
        )
    # fp16 conv slots of 15 elems (2-byte words), 14 (4-byte words), 16 (8-byte words)
    for c, k in ((5, 3), (7, 2), (4, 4)):
        yield pytest.param(
            small_config(conv_dim=c, conv_kernel=k, recurrent_state_dtype="float16"), id=f"conv{c}x{k}-fp16"
        )


def random_config(rng) -> Config:
    return Config(
        num_recurrent_layers=int(rng.integers(1, 5)),
        max_batch_size=int(rng.integers(1, 7)),
        recurrent_state_num_heads=int(rng.integers(1, 4)),
        recurrent_state_head_dim=int(rng.choice([1, 3, 5, 8])),
        recurrent_state_size=int(rng.choice([1, 7, 16])),
        conv_dim=int(rng.choice([1, 5, 12])),
        conv_kernel=int(rng.integers(1, 5)),
        max_intermediate_seq_len=int(rng.integers(1, 6)),
        recurrent_state_dtype=str(rng.choice(["float16", "float32", "float64"])),
        conv_state_dtype=str(rng.choice(["float16", "float32"])),
        verify_writes_main_pool=bool(rng.random() < 0.5),
    )


def accept_lengths(rng, view) -> np.ndarray:
    """Random accept lengths for the current ``(active, V)`` view: any number of rows up to active."""
    view_active, seq_len = view
    active = int(rng.integers(0, view_active + 1))
    special = [INT32_MIN, -1, 0, seq_len - 1, seq_len, seq_len + 1, INT32_MAX]
    partial = list(range(1, max(seq_len, 2)))
    values = [int(rng.choice(special + partial + partial)) for _ in range(active)]
    return np.array(values, dtype=np.int32)


def write_through_view(managers, rng):
    """Write the same random bits into one layer tensor of each manager through its public view."""
    config = managers[0].get_config()
    kind = str(rng.choice(KINDS if managers[0].has_intermediate_recurrent_states() else KINDS[:2]))
    layer = int(rng.integers(config.num_recurrent_layers))
    views = [getattr(m, f"get_{kind}_state")(layer) for m in managers]
    values = random_bits(rng, views[0].shape, views[0].dtype)
    views[0][...] = values
    views[1].copy_to_device(values)
    return f"write {kind}[{layer}]"


def run_sequence(config, rng, steps):
    ref, dev = NumpyMambaCacheManager(config), NumbaMambaCacheManager(config)
    assert_same_bits(snapshot(ref), snapshot(dev), "construction")
    fill_random([ref, dev], rng)
    for step in range(steps):
        op = rng.choice(
            [
                "write",
                "clear",
                "capture",
                "reshape",
                "scatter",
                "scatter",
                "scatter",
                "bad",
                "clear_slot",
                "restore",
                "indices",
                "tree",
            ]
        )
        if op == "write":
            what = write_through_view([ref, dev], rng)
        elif op == "clear":
            what = "clear"
            ref.clear_states()
            dev.clear_states()
        elif op == "capture":
            kind = str(rng.choice(["recurrent", "conv"]))
            slot = int(rng.integers(config.max_batch_size))
            what = f"capture {kind} slot {slot}"
            got = getattr(dev, f"capture_{kind}_states")(slot)
            want = getattr(ref, f"capture_{kind}_states")(slot)
            assert len(got) == len(want) == config.num_recurrent_layers
            for g, w in zip(got, want, strict=True):
                assert to_host(g).tobytes() == w.tobytes(), what
        elif op == "reshape":
            active = int(rng.integers(1, config.max_batch_size + 1))
            seq = int(rng.integers(1, config.max_intermediate_seq_len + 1))
            what = f"reshape({active}, {seq})"
            ref.reshape_intermediate_states(active, seq)
            dev.reshape_intermediate_states(active, seq)
        elif op == "scatter":
            acc = accept_lengths(rng, ref.intermediate_shape)
            what = f"scatter {acc.tolist()} V={ref.intermediate_shape[1]}"
            ref.scatter_mtp_states(acc)
            from numba import cuda

            dev.scatter_mtp_states(cuda.to_device(acc) if rng.random() < 0.7 else acc)
        elif op == "clear_slot":
            slot = int(rng.integers(config.max_batch_size))
            what = f"clear_slot({slot})"
            ref.clear_slot(slot)
            dev.clear_slot(slot)
        elif op == "restore":
            source, target = (int(x) for x in rng.integers(config.max_batch_size, size=2))
            rec_layers, conv_layers = (int(x) for x in rng.integers(config.num_recurrent_layers + 1, size=2))
            what = f"restore_slot({target}) from slot {source}, {rec_layers}/{conv_layers} layers"
            for manager in (ref, dev):
                rec, conv = manager.capture_recurrent_states(source), manager.capture_conv_states(source)
                manager.restore_slot(target, rec[:rec_layers], conv[:conv_layers])
        elif op == "indices":
            from numba import cuda

            acc = accept_lengths(rng, ref.intermediate_shape)
            slots = rng.permutation(config.max_batch_size + 2)[: acc.size] - 1  # distinct, some out of range
            indices = slots.astype(np.int32)
            what = f"scatter {acc.tolist()} -> slots {indices.tolist()}"
            ref.scatter_mtp_states(acc, state_indices=indices)
            dev.scatter_mtp_states(cuda.to_device(acc), state_indices=cuda.to_device(indices))
        elif op == "tree":
            from numba import cuda

            seq_len = ref.intermediate_shape[1]
            acc = accept_lengths(rng, ref.intermediate_shape)
            width = int(rng.integers(1, 5))
            nodes = rng.choice(
                [INT32_MIN, -1, 0, 1, seq_len - 1, seq_len, INT32_MAX, 2], size=(acc.size, width)
            ).astype(np.int32)
            what = f"tree nodes {nodes.tolist()} accept {acc.tolist()}"
            ref.scatter_accepted_tree_states(nodes, acc)
            dev.scatter_accepted_tree_states(cuda.to_device(nodes), cuda.to_device(acc))
        else:
            what = "bad call"
            bad = int(config.max_batch_size + 1)
            for manager in (ref, dev):
                with pytest.raises(ValueError):
                    manager.reshape_intermediate_states(bad, 1)
                with pytest.raises(ValueError):
                    manager.scatter_mtp_states(np.zeros(bad, dtype=np.int32))
                with pytest.raises(IndexError):
                    manager.capture_conv_states(bad)
        assert_same_bits(snapshot(ref), snapshot(dev), f"step {step}: {what}")
        assert ref.intermediate_shape == dev.intermediate_shape


@pytest.mark.parametrize("config", list(edge_configs()))
def test_parity_on_block_edges(config, rng):
    run_sequence(config, rng, steps=12)


@pytest.mark.parametrize("case", range(8 if not ON_GPU else 40))
def test_parity_random_configs(case, rng):
    config = random_config(rng)
    print(config)
    run_sequence(config, rng, steps=15)
