"""Compile, for a real GPU, every kernel the simulator ran: typing errors found without a GPU.

    python .ci/compile_check.py [pytest arguments]     (default: the kernel test files, -m "not slow")

The CUDA simulator runs a kernel's Python line by line and never types it, so a kernel that only
ever ran there can still fail to compile on the GPU machine (a tuple of mixed types, an int64 where
a uint32 is needed, an unsupported call). This script runs the given tests under the simulator with
a hook that records, for each launch of a module-level ``@cuda.jit`` kernel, the Numba types of its
arguments (a simulated device array is typed as the host array it wraps: the same dtype, rank and
layout a device array gets), then, in a second process without the simulator, compiles each
(kernel, types) pair to PTX for sm_90 with NVVM (no GPU needed) and prints what fails.

Kernels built inside functions (the converting commits' and the tiled replay kernels' factories)
cannot be imported by name: they are listed as skipped; their own PTX tests compile them
(``tests/test_precision.py``, ``tests/test_replay.py``, marked slow). Exit status 1 if a compile
failed, 0 otherwise.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = [
    "tests/test_numba.py",
    "tests/test_padding.py",
    "tests/test_quant8_numba.py",
    "tests/test_checkpoint.py",
    "tests/test_moving.py",
    "tests/test_chunked_prefill.py",
    "tests/test_prefix.py",
    "tests/test_prefix_offgrid.py",
    "tests/test_replay.py",
    "-m",
    "not slow",
]


def record(pytest_args: list[str], out: Path) -> int:
    """Run the tests under the simulator, recording {(module, name): {argument types}}; return pytest's status."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import numba
    import pytest
    from numba.cuda.simulator import kernel as simulated
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    seen: dict[tuple[str, str], set] = {}
    launch = simulated.FakeCUDAKernel.__call__

    def typed(arg):
        if isinstance(arg, FakeCUDAArray):
            return numba.typeof(arg._ary)
        return numba.typeof(arg)

    def recording_call(self, *args):
        if not self._device and not simulated._kernel_context:  # a launch from the host
            key = (self.fn.__module__, self.fn.__qualname__)
            try:
                seen.setdefault(key, set()).add(tuple(typed(a) for a in args))
            except Exception as error:  # an argument Numba cannot type is itself a finding
                seen.setdefault(key, set()).add(("untypable", repr(error)))
        return launch(self, *args)

    simulated.FakeCUDAKernel.__call__ = recording_call
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *pytest_args])
    out.write_bytes(pickle.dumps(seen))
    return int(status)


def compile_all(recorded: Path) -> int:
    """Compile every recorded (kernel, types) for sm_90; print one line each; 1 if any failed."""
    import importlib
    from types import SimpleNamespace

    from numba import cuda
    from numba.cuda import dispatcher

    # A called (not inlined) device function compiles for the current device's compute capability:
    # there is no device here, so it is told the one compile_ptx targets.
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    seen = pickle.loads(recorded.read_bytes())
    failed = 0
    for (module, name), signatures in sorted(seen.items()):
        if "<locals>" in name:
            print(f"skipped   {module}.{name} (built by a factory)")
            continue
        kernel = getattr(importlib.import_module(module), name)
        for types in sorted(signatures, key=repr):
            if types and types[0] == "untypable":
                failed += 1
                print(f"FAILED    {module}.{name}: an argument Numba cannot type: {types[1]}")
                continue
            try:
                cuda.compile_ptx(kernel.py_func, types, cc=(9, 0))
            except Exception as error:  # noqa: BLE001 -- any compile error is the finding
                failed += 1
                first = str(error).strip().splitlines()[0]
                print(f"FAILED    {module}.{name}{tuple(map(str, types))}: {type(error).__name__}: {first}")
            else:
                print(f"compiled  {module}.{name} ({len(types)} arguments)")
    print(f"{failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    """Record under the simulator, then compile in a second process (``--compile FILE`` is that second step)."""
    if argv[:1] == ["--compile"]:
        return compile_all(Path(argv[1]))
    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "kernels.pickle"
        status = record(argv or DEFAULT_TESTS, recorded)
        if status not in (0, 5):
            print(f"the tests failed under the simulator (pytest status {status}); compiling what ran")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=str(ROOT))
        compiled = subprocess.run([sys.executable, __file__, "--compile", str(recorded)], env=env, cwd=ROOT)
        return compiled.returncode or (1 if status not in (0, 5) else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
