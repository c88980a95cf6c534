# %% [markdown]
# # 04 · The Numba backend: device arrays, streams, zero-copy, CUDA graphs
#
# What you will learn: the same cache on a GPU through Numba, with work queued on a CUDA stream;
# sharing its tensors with PyTorch and CuPy without copies; capturing the scatter in a CUDA graph.
# Without a GPU this tutorial runs on Numba's CUDA simulator; its GPU-only parts then show the
# output recorded the last time it ran on a GPU (`tutorials/recorded/04-gpu.txt`, which names the
# card and the date; every run on a GPU rewrites it).

# %%
from mamba_cache import select_numba_target

on_gpu = select_numba_target()  # before numba is imported: the GPU, or the simulator
import datetime
import os
import pathlib

import numpy as np
from numba import cuda

import mamba_cache
from mamba_cache import Config, NumbaMambaCacheManager, NumpyMambaCacheManager

print("running on", "the GPU" if on_gpu else "the CUDA simulator")

config = Config(
    num_recurrent_layers=3,
    max_batch_size=4,
    recurrent_state_num_heads=2,
    recurrent_state_head_dim=4,
    recurrent_state_size=8,
    conv_dim=24,
    conv_kernel=4,
    max_intermediate_seq_len=3,
    recurrent_state_dtype="float32",
)
stream = cuda.stream()
cache = NumbaMambaCacheManager(config, stream=stream)
state = cache.get_recurrent_state(0)
print(type(state).__name__, state.shape, state.dtype)

# %% [markdown]
# Two helpers for the GPU-only sections below: on a GPU they print and keep the output for the
# recording; without one they print the recorded output, naming the card and the date.

# %%
here = pathlib.Path(mamba_cache.__file__).parents[1] / "tutorials" / "recorded"
RECORDING = pathlib.Path(os.environ.get("MAMBA_CACHE_RECORDINGS") or here) / "04-gpu.txt"
recorded = {}


def gpu_output(section, lines):
    """On a GPU: print ``lines`` and keep them for the recording."""
    recorded[section] = list(lines)
    print("\n".join(lines))


def replay_recorded(section):
    """Without a GPU: print what ``section`` printed on the GPU named in the recording."""
    header, *rest = (RECORDING.read_text() if RECORDING.exists() else "").splitlines() or [""]
    sections, name = {}, None
    for line in rest:  # "[section]" lines, each followed by what that section printed
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1]
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    lines = sections.get(section)
    if not header.startswith("# recorded on ") or not lines:
        print("(no GPU here, and no recorded GPU output yet: run this tutorial on a GPU to record it)")
        return
    print(f"(no GPU here: output {header[2:]})")
    print("\n".join(lines))


# %% [markdown]
# Every method takes `stream=`; work is asynchronous, so synchronise before reading on the host.
# `accept_lengths` lives on the device (a host array is copied over on the stream).

# %%
rng = np.random.default_rng(0)
reference = NumpyMambaCacheManager(config)
for layer in range(3):
    for kind in ("recurrent", "conv", "intermediate_recurrent", "intermediate_conv"):
        values = rng.standard_normal(getattr(reference, f"get_{kind}_state")(layer).shape)
        getattr(reference, f"get_{kind}_state")(layer)[...] = values
        getattr(cache, f"get_{kind}_state")(layer).copy_to_device(
            np.ascontiguousarray(getattr(reference, f"get_{kind}_state")(layer)), stream=stream
        )
accept = np.array([1, 2, 3, 0], dtype=np.int32)
cache.scatter_mtp_states(cuda.to_device(accept, stream=stream), stream=stream)
reference.scatter_mtp_states(accept)
stream.synchronize()
same = all(
    np.array_equal(cache.get_recurrent_state(i).copy_to_host(), reference.get_recurrent_state(i)) for i in range(3)
)
print("device scatter == NumPy reference:", same)
assert same

# %% [markdown]
# ## Zero-copy with PyTorch and CuPy (GPU only)
# The tensors expose `__cuda_array_interface__`: `torch.as_tensor(view, device="cuda")` and
# `cupy.asarray(view)` share the cache's memory.

# %%
if on_gpu:
    try:
        import torch

        t = torch.as_tensor(cache.get_conv_state(1), device="cuda")
        t.zero_()
        torch.cuda.synchronize()
        gpu_output("zero-copy", [f"torch wrote the cache: {not cache.get_conv_state(1).copy_to_host().any()}"])
    except ImportError:
        print("torch not installed")
else:
    replay_recorded("zero-copy")

# %% [markdown]
# ## A CUDA graph of the scatter (GPU only)
# The scatter launches a prepared kernel: no allocation, no synchronisation. Capture it once, then
# each step only writes new accept lengths into the same device array and replays the graph.

# %%
if on_gpu:
    from cuda.bindings import driver

    d_accept = cuda.to_device(np.zeros(4, dtype=np.int32), stream=stream)
    cache.scatter_mtp_states(d_accept, stream=stream)  # prepares the launch
    stream.synchronize()
    handle = int(stream.handle)
    driver.cuStreamBeginCapture(handle, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_GLOBAL)
    cache.scatter_mtp_states(d_accept, stream=stream)
    _, graph = driver.cuStreamEndCapture(handle)
    _, exec_graph = driver.cuGraphInstantiate(graph, 0)
    d_accept.copy_to_device(np.array([2, 2, 2, 2], dtype=np.int32), stream=stream)
    driver.cuGraphLaunch(exec_graph, handle)
    reference.scatter_mtp_states(np.array([2, 2, 2, 2], dtype=np.int32))
    stream.synchronize()
    replayed = np.array_equal(cache.get_recurrent_state(2).copy_to_host(), reference.get_recurrent_state(2))
    gpu_output("graph", [f"graph replay == reference: {replayed}"])
    assert replayed
else:
    replay_recorded("graph")

# %% [markdown]
# On a GPU the tutorial rewrites its recording, naming the card and the date.

# %%
if on_gpu:
    from mamba_cache.core.numba_backend import device_name

    RECORDING.parent.mkdir(parents=True, exist_ok=True)
    sections = "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in recorded.items())
    RECORDING.write_text(f"# recorded on {device_name()}, {datetime.date.today().isoformat()}\n{sections}")
    print(f"recorded the GPU output in {RECORDING.name}")
else:
    print("(no GPU here: the recording is left as it is)")
