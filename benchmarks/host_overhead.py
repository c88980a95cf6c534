"""Host time of single calls, and of their parts, on the edge config (benchmarks/NOTES.md).

python benchmarks/host_overhead.py      # needs a CUDA GPU
"""

import statistics
import time

import numpy as np
from cuda.bindings import driver
from numba import cuda

from mamba_cache import Config, NumbaMambaCacheManager

cfg = Config(
    num_recurrent_layers=24,
    max_batch_size=1,
    recurrent_state_num_heads=32,
    recurrent_state_head_dim=64,
    recurrent_state_size=128,
    conv_dim=4096,
    conv_kernel=4,
    max_intermediate_seq_len=4,
)
m = NumbaMambaCacheManager(cfg)
acc = cuda.to_device(np.array([0], np.int32))
m.scatter_mtp_states(acc)
m.clear_states()
cuda.synchronize()


def host(label, f, n=400, sync=True):
    s = []
    for _ in range(n):
        if sync:
            cuda.synchronize()
        t = time.perf_counter()
        f()
        s.append(time.perf_counter() - t)
    cuda.synchronize()
    print(f"{label:<44} median {1e6 * statistics.median(s):8.2f} us  p10 {1e6 * np.percentile(s, 10):8.2f}")


host("scatter_mtp_states (sync between)", lambda: m.scatter_mtp_states(acc))
host("scatter_mtp_states (burst, rows skipped)", lambda: m.scatter_mtp_states(acc), sync=False)
host("clear_states (sync between)", lambda: m.clear_states())
st = m._stream(None)
nb = 24 * 512 * 1024


def alloc_free():
    err, p = driver.cuMemAllocAsync(nb, 0)
    driver.cuMemFreeAsync(p, 0)


host("cuMemAllocAsync+Free 12 MiB (burst)", alloc_free, sync=False)
host("cuda.current_context()", cuda.current_context, sync=False)
host("capture_recurrent_states (burst)", lambda: m.capture_recurrent_states(0), n=100, sync=False)
host("capture_recurrent_states (sync)", lambda: m.capture_recurrent_states(0), n=100)
host("cuda.device_array 12 MiB (burst)", lambda: cuda.device_array(nb, np.uint8), n=100, sync=False)
