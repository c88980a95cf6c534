"""Index arguments given as CPU tensors (issue #23): the CUDA simulator takes a CPU torch tensor (or
any CPU tensor exporting DLPack / ``__array__``) as it takes a NumPy array; a real GPU keeps refusing
a CPU torch tensor for a device argument."""

import numpy as np
import pytest
from helpers import ON_GPU, assert_same_bits, fill_random, small_config, snapshot

from mamba_cache import NumbaMambaCacheManager, NumpyMambaCacheManager
from mamba_cache.interop.arrays import host_index_array
from mamba_cache.interop.dlpack import KDL_CPU, KDL_CUDA

ACCEPT = [2, 0, 4, 1]


class HostTensor:
    """A CPU tensor that is not a NumPy array: exports its memory through DLPack and ``__array__``."""

    def __init__(self, values, dtype=np.int32):
        self._array = np.ascontiguousarray(np.asarray(values, dtype=dtype))

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (KDL_CPU, 0)

    def __array__(self, dtype=None, copy=None):
        return self._array


class TorchLikeCPUTensor(HostTensor):
    """What the backend reads of a CPU ``torch.Tensor``: its module, ``is_cuda``, ``device``."""

    is_cuda = False
    device = "cpu"


TorchLikeCPUTensor.__module__ = "torch"  # the backend recognises torch tensors by their class's module


def scatter_both(accept):
    """The NumPy reference scattered with ``ACCEPT``, the Numba backend with ``accept``."""
    rng = np.random.default_rng(23)
    ref, dev = NumpyMambaCacheManager(small_config()), NumbaMambaCacheManager(small_config())
    fill_random([ref, dev], rng)
    ref.scatter_mtp_states(np.array(ACCEPT, np.int32))
    dev.scatter_mtp_states(accept)
    return ref, dev


@pytest.mark.skipif(ON_GPU, reason="the simulator's behaviour; a GPU refuses it (next test)")
def test_simulator_takes_a_cpu_torch_tensor_as_a_numpy_array():
    ref, dev = scatter_both(TorchLikeCPUTensor(ACCEPT))
    assert_same_bits(snapshot(ref), snapshot(dev), "CPU tensor accept_lengths")


@pytest.mark.skipif(ON_GPU, reason="the simulator's behaviour")
def test_simulator_checks_a_cpu_tensor_as_it_checks_a_numpy_array():
    dev = NumbaMambaCacheManager(small_config())
    with pytest.raises(TypeError, match="accept_lengths must have dtype int32, got int64"):
        dev.scatter_mtp_states(TorchLikeCPUTensor(ACCEPT, np.int64))
    with pytest.raises(TypeError, match="accept_lengths must have dtype int32, got int64"):
        dev.scatter_mtp_states(np.array(ACCEPT, np.int64))  # the same message as NumPy's


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the GPU machine)")
def test_gpu_refuses_a_cpu_torch_tensor_for_a_device_argument():
    dev = NumbaMambaCacheManager(small_config())
    with pytest.raises(TypeError, match="accept_lengths must be on the GPU, got a torch tensor on cpu"):
        dev.scatter_mtp_states(TorchLikeCPUTensor(ACCEPT))


def test_any_host_dlpack_tensor_is_staged_like_a_numpy_array():
    # Not torch: a host DLPack export is imported and staged, on the GPU and in the simulator alike.
    ref, dev = scatter_both(HostTensor(ACCEPT))
    assert_same_bits(snapshot(ref), snapshot(dev), "host DLPack accept_lengths")


def test_host_index_array_reads_dlpack_or_array_and_names_the_argument():
    tensor = HostTensor(ACCEPT)
    view = host_index_array("accept_lengths", tensor)
    assert view.dtype == np.int32 and view.tolist() == ACCEPT
    assert np.shares_memory(view, tensor._array)  # no copy

    class ArrayOnly:
        def __array__(self, dtype=None, copy=None):
            return np.array(ACCEPT, np.int32)

    assert host_index_array("accept_lengths", ArrayOnly()).tolist() == ACCEPT

    class OnTheGPU(HostTensor):
        def __dlpack_device__(self):
            return (KDL_CUDA, 0)

    with pytest.raises(TypeError, match="accept_lengths must be a host or GPU tensor, got a DLPack tensor on device"):
        host_index_array("accept_lengths", OnTheGPU(ACCEPT))
    with pytest.raises(TypeError, match="state_indices must export DLPack .host memory. or __array__, got object"):
        host_index_array("state_indices", object())


def test_real_cpu_torch_tensor():
    torch = pytest.importorskip("torch")
    accept = torch.tensor(ACCEPT, dtype=torch.int32)  # on the CPU
    if ON_GPU:
        with pytest.raises(TypeError, match="accept_lengths must be on the GPU, got a torch tensor on cpu"):
            NumbaMambaCacheManager(small_config()).scatter_mtp_states(accept)
        return
    ref, dev = scatter_both(accept)
    assert_same_bits(snapshot(ref), snapshot(dev), "CPU torch accept_lengths")
