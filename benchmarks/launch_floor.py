"""The floor under an eager call's host time: ways to launch one prepared kernel, timed alone.

    python benchmarks/launch_floor.py      # needs a CUDA GPU and PyTorch

Times (median of single calls queued behind a sleep kernel, as benchmarks/engine.py does) the
launch of the scatter kernel with its parameter block already marshalled, through:
``cuda.bindings`` ``cuLaunchKernel`` (what ``PreparedLaunch`` uses), ``cuLaunchKernel`` called
straight into libcuda through ``ctypes`` with declared argument types, and ``cuGraphLaunch`` of a
one-node graph holding the same launch; plus the device-context query both ways. It writes
nothing: its output goes into benchmarks/NOTES.md.
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from cuda.bindings import driver  # noqa: E402

from benchmarks.engine import CONFIG  # noqa: E402
from mamba_cache import NumbaMambaCacheManager  # noqa: E402
from mamba_cache.core import kernels  # noqa: E402

N = 400


def host_us(call) -> float:
    samples = []
    for _ in range(3):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)
        for _ in range(N):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def graph_launch(driver, launch, grid, threads, params, handle) -> None:
    err, graph = driver.cuGraphCreate(0)
    node_params = driver.CUDA_KERNEL_NODE_PARAMS()
    node_params.func = launch._function
    node_params.gridDimX, node_params.gridDimY, node_params.gridDimZ = grid
    node_params.blockDimX, node_params.blockDimY, node_params.blockDimZ = threads, 1, 1
    node_params.sharedMemBytes = 0
    node_params.kernelParams = params
    err, _node = driver.cuGraphAddKernelNode(graph, None, 0, node_params)
    assert not int(err), err
    err, graph_exec = driver.cuGraphInstantiate(graph, 0)
    assert not int(err), err
    print(
        f"  cuGraphLaunch (one node)              {host_us(lambda: driver.cuGraphLaunch(graph_exec, handle)):6.2f} us"
    )


def main() -> int:
    print(torch.cuda.get_device_name())
    dev = NumbaMambaCacheManager(CONFIG)
    launch, blocks, layers = dev._commit_launch("scatter", kernels.scatter_accepted)
    stream = torch.cuda.Stream()
    handle = int(stream.cuda_stream)
    grid = (blocks, 8, layers)
    ref = dev._stream(handle)
    x = torch.zeros(1024, device="cuda")
    with torch.cuda.stream(stream):
        print(f"  torch x.add_(1)                       {host_us(lambda: x.add_(1)):6.2f} us")
    print(f"  cuda.bindings cuLaunchKernel          {host_us(lambda: launch.launch(grid, ref)):6.2f} us")

    libcuda = ctypes.CDLL("libcuda.so.1")
    fn = libcuda.cuLaunchKernel
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,
        *[ctypes.c_uint] * 6,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    function = int(launch._function)
    params, threads = launch._params, launch._threads
    args = (function, *grid, threads, 1, 1, 0, handle, params, None)
    assert fn(*args) == 0
    print(f"  ctypes cuLaunchKernel (argtypes)      {host_us(lambda: fn(*args)):6.2f} us")

    try:
        graph_launch(driver, launch, grid, threads, params, handle)
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"  cuGraphLaunch skipped: {type(error).__name__}: {error}")
    ctx = libcuda.cuCtxGetCurrent
    ctx.restype, ctx.argtypes = ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p)]
    out = ctypes.c_void_p()
    pointer = ctypes.byref(out)
    print(f"  cuda.bindings cuCtxGetCurrent         {host_us(driver.cuCtxGetCurrent):6.2f} us")
    print(f"  ctypes cuCtxGetCurrent                {host_us(lambda: ctx(pointer)):6.2f} us")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
