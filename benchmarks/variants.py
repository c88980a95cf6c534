"""Kernel design experiments behind the choices in mamba_cache/core/kernels.py (see NOTES.md).

    python benchmarks/variants.py

Each variant is the scatter kernel of ``mamba_cache.core.kernels`` with one choice changed: the word
width (8- or 4-byte words), the words each thread copies (1, 2, 4, 8), and the grid shape (the
3-D (chunk, row, layer) grid against a 1-D grid-stride loop). Each is validated against the
shipped kernel's result, then timed with CUDA events on the mid and large configs of run.py.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from numba import cuda  # noqa: E402

from benchmarks.run import CONFIGS, copied_rows  # noqa: E402


def make_3d(wpt: int):
    @cuda.jit
    def kernel(dst, src, accept_lengths, seq_len):
        layer, row = cuda.blockIdx.z, cuda.blockIdx.y
        accepted = accept_lengths[row]
        if accepted < 1 or accepted >= seq_len:
            return
        src_row = row * seq_len + (accepted - 1)
        threads = cuda.blockDim.x
        base = cuda.blockIdx.x * threads * wpt + cuda.threadIdx.x
        words = dst.shape[2]
        buf = cuda.local.array(wpt, dst.dtype)
        for i in range(wpt):
            w = base + i * threads
            if w < words:
                buf[i] = src[layer, src_row, w]
        for i in range(wpt):
            w = base + i * threads
            if w < words:
                dst[layer, row, w] = buf[i]

    return kernel


@cuda.jit
def grid_stride(dst, src, accept_lengths, seq_len):
    """One flat index over (layer, row, word); every thread strides over the whole job."""
    layers, rows, words = dst.shape[0], accept_lengths.shape[0], dst.shape[2]
    total = layers * rows * words
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for flat in range(start, total, stride):
        w = flat % words
        row = (flat // words) % rows
        layer = flat // (words * rows)
        accepted = accept_lengths[row]
        if accepted >= 1 and accepted < seq_len:
            dst[layer, row, w] = src[layer, row * seq_len + accepted - 1, w]


def time_us(fn, n=20, repeats=7):
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / n)
    return statistics.median(samples)


def main() -> int:
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'config':<6} {'variant':<28} {'us':>9} {'GB/s':>7}")
    for name in ("mid", "large"):
        config, accept = CONFIGS[name]
        layers, slots, seq = config.num_recurrent_layers, config.max_batch_size, config.max_intermediate_seq_len
        slot_bytes = config.recurrent_slot_elems * config.recurrent_state_dtype.itemsize
        main_pool = torch.empty(layers * slots * slot_bytes, dtype=torch.uint8, device="cuda").random_()
        inter_pool = torch.empty(layers * slots * seq * slot_bytes, dtype=torch.uint8, device="cuda").random_()
        acc = cuda.as_cuda_array(torch.tensor(accept, dtype=torch.int32, device="cuda"))
        nbytes = 2 * layers * copied_rows(accept, seq) * slot_bytes
        initial = main_pool.clone()
        expected = initial.view(layers, slots, -1).clone()
        inter_rows = inter_pool.view(layers, slots * seq, -1)
        for row, accepted in enumerate(accept):
            if 1 <= accepted < seq:
                expected[:, row] = inter_rows[:, row * seq + accepted - 1]
        for word in (8, 4):
            dtype = {8: torch.int64, 4: torch.int32}[word]
            dst = cuda.as_cuda_array(main_pool.view(dtype).view(layers, slots, -1))
            src = cuda.as_cuda_array(inter_pool.view(dtype).view(layers, slots * seq, -1))
            words = dst.shape[2]
            variants = {}
            for wpt in (1, 2, 4, 8):
                kernel = make_3d(wpt)
                chunks = -(-words // (256 * wpt))
                variants[f"3-D grid, {word}B words, {wpt}/thread"] = lambda k=kernel, c=chunks: k[
                    (c, len(accept), layers), 256, stream
                ](dst, src, acc, seq)
            if word == 8:
                variants["1-D grid-stride, 8B words"] = lambda: grid_stride[sms * 8, 256, stream](dst, src, acc, seq)
            for label, fn in variants.items():
                main_pool.copy_(initial)
                fn()
                torch.cuda.synchronize()
                assert torch.equal(main_pool.view_as(expected), expected), f"{label} copies the wrong bytes"
                us = time_us(fn)
                print(f"{name:<6} {label:<28} {us:>9.1f} {nbytes / us / 1e3:>7.0f}", flush=True)
        del main_pool, inter_pool
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
