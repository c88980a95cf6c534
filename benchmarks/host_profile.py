"""Where an eager call's host time goes: each step of the scatter's Python path, timed alone.

    python benchmarks/host_profile.py      # needs a CUDA GPU and PyTorch (CuPy where installed)

benchmarks/engine.py measures whole calls against a torch launch; this script splits one call
into its steps (the device-context check, resolving the stream, checking each index array,
patching the launch, ``cuLaunchKernel``) and times each alone, the same way (median of single
calls queued behind a sleep kernel), for every index-array and stream kind. Then it prints a
cProfile of the slowest combination. It writes nothing: its output goes into benchmarks/NOTES.md.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from numba import cuda  # noqa: E402

from benchmarks.engine import CONFIG  # noqa: E402
from mamba_cache import NumbaMambaCacheManager  # noqa: E402
from mamba_cache.core import numba_backend, numba_device  # noqa: E402

N = 400


def host_us(call, args_list=None) -> float:
    """Median host time of ``call(*args)`` over N calls (a new argument tuple each call if given)."""
    samples = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        for i in range(N):
            args = args_list[i] if args_list is not None else ()
            t0 = time.perf_counter()
            call(*args)
            samples.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def main() -> int:
    card = torch.cuda.get_device_name()
    dev = NumbaMambaCacheManager(CONFIG)
    accept = np.array([2, 0, 3, 1, 4, 2, -1, 1], dtype=np.int32)
    indices = np.random.default_rng(20261128).permutation(8).astype(np.int32)
    side = torch.cuda.Stream()
    arrays = {"numba": cuda.to_device, "torch": lambda a: torch.from_numpy(a).cuda()}
    try:
        import cupy

        arrays["cupy"] = cupy.asarray
    except ImportError:
        pass
    # Fresh stream objects made before timing: the cost measured is the library's, not torch's.
    fresh = {
        "none": [(None,)] * N,
        "numba": [(cuda.external_stream(side.cuda_stream),)] * N,
        "torch_new_object": [(torch.cuda.current_stream(),) for _ in range(N)],
        "int_new_each_call": [(int(side.cuda_stream) + 0,) for _ in range(N)],
    }
    try:
        from cuda.core import Device

        device = Device()
        device.set_current()
        fresh["cuda_core"] = [(device.create_stream(),)] * N
    except Exception as error:  # noqa: BLE001
        print(f"cuda.core skipped: {error}")

    x = torch.zeros(1024, device="cuda")
    print(f"{card}: torch x.add_(1) {host_us(lambda: x.add_(1)):.2f} us host")
    print(f"  torch.cuda.current_stream()      {host_us(torch.cuda.current_stream):.2f} us (the caller's cost)")
    print(f"  int(side.cuda_stream)            {host_us(lambda: int(side.cuda_stream)):.2f} us (the caller's cost)")
    print(f"  cuCtxGetCurrent (the device check) {host_us(numba_device.current_context_handle):.2f} us")
    launch, blocks, layers = dev._commit_launch("scatter", numba_backend.kernels.scatter_accepted)
    ref = dev._stream(None)
    print(f"  launch.launch alone              {host_us(lambda: launch.launch((blocks, 8, layers), ref)):.2f} us")
    for kind, args in fresh.items():
        print(f"  _stream({kind:<18})      {host_us(dev._stream, args):.2f} us")
    worst, worst_us = None, 0.0
    for arg_kind, make in arrays.items():
        acc, idx = make(accept), make(indices)
        check = host_us(lambda acc=acc: dev._check_int32_array("accept_lengths", acc, "[active]", ref))
        cached = host_us(lambda acc=acc: dev._int32_array("accept_lengths", acc, "[active]", ref))
        print(f"  {arg_kind:<6} index array: check {check:.2f} us, through the identity cache {cached:.2f} us")
        for stream_kind, args in fresh.items():
            call = lambda s, acc=acc, idx=idx: dev.scatter_mtp_states(acc, s, state_indices=idx)  # noqa: E731
            us = host_us(call, args)
            print(f"    scatter_mtp_states {arg_kind:<6} {stream_kind:<18} {us:7.2f} us")
            if us > worst_us:
                worst, worst_us = (call, args, arg_kind, stream_kind), us
    call, args, arg_kind, stream_kind = worst
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    profiler.enable()
    for a in args * 10:
        call(*a)
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(f"cProfile of {len(args) * 10} calls, {arg_kind} arrays, {stream_kind} streams (slowest):")
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
