"""Hugging Face ``transformers``' Mamba2 decoding with its cache tensors living in mamba_cache's pools.

A real client nobody here wrote: ``Mamba2ForCausalLM`` with a small random-initialised
``Mamba2Config`` (no weights downloaded, no hub access), its own forward and cache code path
(``torch_forward`` on the CPU, and on a GPU where ``mamba_ssm`` is not installed). The only change
is where the states live: each layer's conv state ``[B, C, K]`` and SSM state ``[B, H, D, N]`` in
the model's cache object are the library's per-layer views, zero copy:

- NumPy backend: ``torch.from_numpy(cache.get_recurrent_state(i))`` shares the host memory;
- Numba backend: ``torch.as_tensor(view, device="cuda")`` shares the device memory through
  ``__cuda_array_interface__``.

Both are for the float16 / float32 pools this example builds: for a bfloat16 pool
``torch.from_numpy`` raises and the CUDA array interface says ``uint16``, so use
``torch.from_dlpack(view)`` (a ``torch.bfloat16`` tensor on either backend, zero copy).

The model updates those tensors in place (``copy_``) when it decodes, so the library sees every
step without a copy, and a ``scatter_mtp_states`` commit is what the model reads next.

What it checks (``run`` returns the evidence, ``main`` prints it):

1. greedy decoding with the library-backed cache gives the same tokens and the same final states
   as greedy decoding with the model's own cache;
2. speculative decoding on top: each round feeds ``[last token, V - 1 drafts]`` one token at a
   time (the verify pass), copies the state after each token into the library's intermediate
   buffers, accepts greedily (the drafts the model agrees with, plus its own next token), and
   commits each row's last accepted state with one ``scatter_mtp_states``. The drafts come from
   an oracle (the plain greedy continuation) with a deliberate error whose position cycles over
   rows and rounds (from a random start; one slot of the cycle is no error), so accept lengths
   run from 1 to V; a wrong commit would change every later token.
   The emitted tokens must equal plain greedy decoding.

Transformers 5 keeps Mamba2's states in ``DynamicCache`` linear-attention layers (``conv_states`` /
``recurrent_states`` dicts per layer, updated with ``copy_``): the library's tensors are placed
there. Transformers 4 keeps them in ``Mamba2Cache`` (stacked ``conv_states`` / ``ssm_states``,
updated by assignment): a small subclass holds per-layer lists of the library's tensors and
updates them in place. Either way every step checks that the model still holds the library's
memory.

Run: ``python examples/hf_mamba2.py`` (NumPy backend, CPU) or ``--backend numba`` (a CUDA GPU).
"""

from __future__ import annotations

import argparse
import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded; make sure nothing is looked up

import sys  # noqa: E402

import numpy as np  # noqa: E402

if __name__ == "__main__":  # run as a script from a checkout: import this checkout's mamba_cache
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_cache import Config  # noqa: E402

VERIFY_LEN = 4


def as_torch(array):
    """A torch tensor sharing ``array``'s memory: host NumPy or a CUDA device array (zero copy)."""
    import torch

    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return torch.as_tensor(array, device="cuda")


def tiny_config(vocab_size: int = 64, layers: int = 2, heads: int = 4, head_dim: int = 8, state: int = 8):
    """A small ``Mamba2Config``: by default 2 layers, 4 heads of 8, state 8; one B/C group, conv kernel 4."""
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=vocab_size,
        hidden_size=heads * head_dim // 2,
        expand=2,  # intermediate_size = num_heads * head_dim
        num_heads=heads,
        head_dim=head_dim,
        state_size=state,
        n_groups=1,
        num_hidden_layers=layers,
        conv_kernel=4,
        chunk_size=16,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=None,
        use_cache=True,
    )


def cache_config(hf_config, batch: int, verify_len: int = VERIFY_LEN) -> Config:
    """The library config whose pools hold ``hf_config``'s states for ``batch`` sequences."""
    intermediate = hf_config.num_heads * hf_config.head_dim
    return Config(
        num_recurrent_layers=hf_config.num_hidden_layers,
        max_batch_size=batch,
        recurrent_state_num_heads=hf_config.num_heads,
        recurrent_state_head_dim=hf_config.head_dim,
        recurrent_state_size=hf_config.state_size,
        conv_dim=intermediate + 2 * hf_config.n_groups * hf_config.state_size,
        conv_kernel=hf_config.conv_kernel,
        max_intermediate_seq_len=verify_len,
        recurrent_state_dtype="float32",
        conv_state_dtype="float32",
        n_groups=hf_config.n_groups,
    )


def _transformers_v5() -> bool:
    from transformers import cache_utils

    return hasattr(cache_utils, "LinearAttentionLayer")


def pooled_hf_cache(model, manager):
    """The model's own cache object, its state tensors replaced by ``manager``'s views.

    Returns:
        ``(hf_cache, conv, rec)``: the cache to pass to the model, and the per-layer torch views
        of the library's conv ``[B, C, K]`` and recurrent ``[B, H, D, N]`` pools it holds.
    """
    layers = manager.get_config().num_recurrent_layers
    conv = [as_torch(manager.get_conv_state(i)) for i in range(layers)]
    rec = [as_torch(manager.get_recurrent_state(i)) for i in range(layers)]
    return hf_cache_over(model, conv, rec), conv, rec


def hf_cache_over(model, conv, rec):
    """The model's own cache object holding per-layer tensors: conv ``[B, C, K]``, recurrent ``[B, H, D, N]``."""
    layers = len(conv)
    if _transformers_v5():
        from transformers import DynamicCache

        hf_cache = DynamicCache(config=model.config)
        for i, layer in enumerate(hf_cache.layers[:layers]):
            layer.conv_states[0], layer.recurrent_states[0] = conv[i], rec[i]
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.conv_kernel_size[0] = conv[i].shape[-1]
            layer.dtype, layer.device = conv[i].dtype, conv[i].device
        return hf_cache
    return _pooled_mamba2_cache_v4(model, conv, rec)


def _pooled_mamba2_cache_v4(model, conv, rec):
    from transformers.models.mamba2 import modeling_mamba2

    class PerLayer(list):
        """Per-layer tensors where the model expects one stacked tensor (it reads ``.device``)."""

        def __init__(self, tensors):
            super().__init__(tensors)
            self.device, self.dtype = tensors[0].device, tensors[0].dtype

    class PooledMamba2Cache(modeling_mamba2.Mamba2Cache):
        """Transformers 4's ``Mamba2Cache`` over per-layer external tensors, updated in place."""

        def __init__(self, conv_states, ssm_states):
            self.conv_states, self.ssm_states = PerLayer(conv_states), PerLayer(ssm_states)
            self.max_batch_size = self.batch_size = conv_states[0].shape[0]
            self.conv_kernel_size = conv_states[0].shape[-1]
            self.dtype, self.device = conv_states[0].dtype, conv_states[0].device
            self.is_initialized = True

        def update_conv_state(self, layer_idx, new_conv_state, cache_position=None, cache_init=False):
            # the parent's two generations of this method, writing into the same tensor
            state = self.conv_states[layer_idx]
            if cache_position is not None:  # 4.48+: roll, write the columns at the clamped positions
                rolled = state.roll(shifts=-1, dims=-1)
                rolled[:, :, cache_position.clamp(0, self.conv_kernel_size - 1)] = new_conv_state.to(state.dtype)
                state.copy_(rolled)
            elif cache_init:  # 4.44-4.47 prefill: the whole window
                state.copy_(new_conv_state)
            else:  # 4.44-4.47 decode: shift left, append the new column [B, 1, C]
                state.copy_(state.roll(shifts=-1, dims=-1))
                state[:, :, -1] = new_conv_state[:, 0, :].to(state.dtype)
            return state

        def update_ssm_state(self, layer_idx, new_ssm_state):
            self.ssm_states[layer_idx].copy_(new_ssm_state)
            return self.ssm_states[layer_idx]

        def reset(self):
            for state in (*self.conv_states, *self.ssm_states):
                state.zero_()

    return PooledMamba2Cache(conv, rec)


def own_hf_cache(model, batch: int):
    """The cache the model makes for itself (``None`` lets transformers 5 build a DynamicCache)."""
    if _transformers_v5():
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from transformers.models.mamba2 import modeling_mamba2

    return modeling_mamba2.Mamba2Cache(model.config, batch, device=model.device, dtype=model.dtype)


def hf_states(hf_cache, layer: int):
    """``(conv [B, C, K], recurrent [B, H, D, N])`` tensors the model holds for ``layer``."""
    if _transformers_v5():
        return hf_cache.layers[layer].conv_states[0], hf_cache.layers[layer].recurrent_states[0]
    return hf_cache.conv_states[layer], hf_cache.ssm_states[layer]


def forward(model, tokens, hf_cache, position: int):
    """Logits ``[B, V]`` after ``tokens`` ``[B, T]`` (a prefill at ``position`` 0, else one token)."""
    import torch

    params = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": True}
    kwargs["cache" if "cache" in params else "cache_params"] = hf_cache
    if "cache_position" in params:  # transformers 4 tells prefill from decode by the position
        kwargs["cache_position"] = torch.arange(position, position + tokens.shape[1], device=tokens.device)
    with torch.no_grad():
        return model(input_ids=tokens, **kwargs).logits[:, -1].float()


def greedy(model, prompt, steps: int, hf_cache):
    """Plain greedy decoding: ``steps`` new tokens ``[B, steps]`` after ``prompt`` ``[B, T]``."""
    import torch

    out = []
    token = forward(model, prompt, hf_cache, 0).argmax(-1)
    for t in range(steps):
        out.append(token)
        if t + 1 < steps:
            token = forward(model, token[:, None], hf_cache, prompt.shape[1] + t).argmax(-1)
    return torch.stack(out, dim=1)


def _assert_shared(hf_cache, conv, rec) -> None:
    for i in range(len(conv)):
        held_conv, held_rec = hf_states(hf_cache, i)
        if held_conv.data_ptr() != conv[i].data_ptr() or held_rec.data_ptr() != rec[i].data_ptr():
            raise AssertionError(f"layer {i}: the model no longer holds the library's tensors (a copy was made)")


def speculative(model, manager, prompt, oracle, steps: int, rng, verify_len: int = VERIFY_LEN, commit: bool = True):
    """Greedy speculative decoding with verify + ``scatter_mtp_states`` on the library's pools.

    Args:
        model: a ``Mamba2ForCausalLM``.
        manager: a cache manager built with `cache_config` for this model and batch.
        prompt: ``[B, T]`` int64 prompt.
        oracle: ``[B, >= steps + verify_len]`` the plain greedy continuation the drafts come from.
        steps: tokens to produce per row.
        rng: numpy Generator that picks where the drafts start going wrong.
        verify_len: V, tokens per verify pass (the last token plus ``V - 1`` drafts).
        commit: False skips the scatter (the tests' proof that the commit matters).

    Returns:
        ``(tokens [B, steps], accept_lengths per round)``.
    """
    import torch

    batch = prompt.shape[0]
    hf_cache, conv, rec = pooled_hf_cache(model, manager)
    device = prompt.device
    last = forward(model, prompt, hf_cache, 0).argmax(-1)  # [B]: produced, not yet fed
    emitted = [[int(t)] for t in last.tolist()]
    oracle_np = oracle.cpu().numpy()
    position, history = prompt.shape[1], []
    manager.reshape_intermediate_states(batch, verify_len)
    inter_conv = [as_torch(manager.get_intermediate_conv_state(i)) for i in range(len(conv))]
    inter_rec = [as_torch(manager.get_intermediate_recurrent_state(i)) for i in range(len(rec))]
    # The error position cycles over rows and rounds from a random start: within two rounds of
    # three rows every accept length 1 .. V has come up.
    offset = int(rng.integers(0, verify_len))
    while min(len(row) for row in emitted) < steps:
        drafts = np.empty((batch, verify_len - 1), dtype=np.int64)
        for b in range(batch):
            start = len(emitted[b])
            # rows already past `steps` (others lag behind) draft anything: their extra tokens are dropped
            drafts[b] = oracle_np[b, np.minimum(np.arange(start, start + verify_len - 1), oracle_np.shape[1] - 1)]
            wrong = (offset + len(history) + b) % verify_len  # == verify_len - 1: no error, a full accept
            if wrong < verify_len - 1:
                drafts[b, wrong] = (drafts[b, wrong] + 1) % model.config.vocab_size
        inputs = torch.cat([last[:, None], torch.from_numpy(drafts).to(device)], dim=1)  # [B, V]
        predicted = []
        for t in range(verify_len):  # the verify pass, one token at a time
            predicted.append(forward(model, inputs[:, t : t + 1], hf_cache, position + t).argmax(-1))
            for i in range(len(conv)):  # record the state after token t
                inter_conv[i][:, t].copy_(conv[i])
                inter_rec[i][:, t].copy_(rec[i])
        predicted = torch.stack(predicted, dim=1).cpu().numpy()  # [B, V]
        agree = np.cumprod(drafts == predicted[:, :-1], axis=1).sum(axis=1)
        accept = (1 + agree).astype(np.int32)  # inputs whose state is kept: the last token + agreed drafts
        accept_arg = accept if manager.backend == "numpy" else _to_device(accept)
        if commit:
            manager.scatter_mtp_states(accept_arg)  # a full accept (V) is already in the pool: untouched
        _assert_shared(hf_cache, conv, rec)
        for b in range(batch):
            emitted[b].extend(int(t) for t in predicted[b, : accept[b]])
        last = torch.from_numpy(predicted[np.arange(batch), accept - 1]).to(device)
        # Rows now sit at different positions; transformers 5 ignores positions in decode and
        # transformers 4 only checks that they are past the prefill.
        position += verify_len
        history.append(accept.tolist())
    return torch.tensor([row[:steps] for row in emitted]), history


def _to_device(array: np.ndarray):
    from numba import cuda

    return cuda.to_device(array)


def run(
    backend: str = "numpy", seed: int = 0, batch: int = 3, prompt_len: int = 5, steps: int = 12, commit: bool = True
) -> dict:
    """Build the model and both caches, decode, and return the evidence (tokens, states, accepts).

    Returns:
        A dict: ``own`` / ``pooled`` / ``speculative`` tokens ``[B, steps]`` (torch int64, host),
        ``state_max_diff`` (largest |difference| between the final states the model's own cache
        and the library's pools hold after plain decoding), ``accept_history`` (per round, per
        row), ``zero_copy`` (True: the model wrote into the library's memory). ``commit=False``
        skips the scatter, so the speculative tokens go wrong after the first partial accept.
    """
    import torch
    from transformers import Mamba2ForCausalLM

    if backend == "numpy":
        from mamba_cache import NumpyMambaCacheManager as Manager

        device = "cpu"
    else:
        from mamba_cache import NumbaMambaCacheManager as Manager

        device = "cuda"
    torch.manual_seed(seed)
    hf_config = tiny_config()
    model = Mamba2ForCausalLM(hf_config).to(device).eval()
    rng = np.random.default_rng(seed)
    prompt = torch.from_numpy(rng.integers(1, hf_config.vocab_size, size=(batch, prompt_len))).to(device)

    own = own_hf_cache(model, batch)
    own_tokens = greedy(model, prompt, steps + VERIFY_LEN, own)

    manager = Manager(cache_config(hf_config, batch))
    pooled, conv, rec = pooled_hf_cache(model, manager)
    pooled_tokens = greedy(model, prompt, steps + VERIFY_LEN, pooled)
    _assert_shared(pooled, conv, rec)
    diffs = []
    for i in range(hf_config.num_hidden_layers):
        own_conv, own_rec = hf_states(own, i)
        library_conv = torch.from_numpy(np.asarray(_host(manager.get_conv_state(i)))).to(device)
        library_rec = torch.from_numpy(np.asarray(_host(manager.get_recurrent_state(i)))).to(device)
        diffs += [(own_conv - library_conv).abs().max().item(), (own_rec - library_rec).abs().max().item()]

    spec_manager = Manager(cache_config(hf_config, batch))
    spec_tokens, history = speculative(model, spec_manager, prompt, own_tokens, steps, rng, commit=commit)
    return {
        "own": own_tokens[:, :steps].cpu(),
        "pooled": pooled_tokens[:, :steps].cpu(),
        "speculative": spec_tokens,
        "state_max_diff": max(diffs),
        "accept_history": history,
        "zero_copy": True,  # _assert_shared raised otherwise
    }


def _host(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.copy_to_host()


def main() -> None:
    """Command line: run on one backend and print what was checked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("numpy", "numba"), default="numpy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run(args.backend, args.seed)
    print("greedy, model's own cache :", result["own"].tolist())
    print("greedy, library's pools   :", result["pooled"].tolist())
    print("speculative + scatter     :", result["speculative"].tolist())
    print("accept lengths per round  :", result["accept_history"])
    print("max |state difference|    :", result["state_max_diff"])
    same = bool((result["own"] == result["pooled"]).all() and (result["own"] == result["speculative"]).all())
    print("same tokens everywhere    :", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
