"""The command line as a newcomer meets it: bad input is one line on stderr and exit status 2, printed
before anything else; absurd sizes get units that fit and a warning."""

import os
import subprocess
import sys

import pytest
from helpers import ON_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env=None):
    env = dict(os.environ if env is None else env, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mamba_cache.cli", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )


def assert_one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == "", result.stdout  # nothing printed before the check
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--budget", "20XB"], ["budget must look like 20GiB", "'20XB'"]),
        (["--budget", "1e30"], ["at most 16 EiB", "'1e30'"]),
        (["--budget", "-5GiB"], ["budget must be >= 0", "'-5GiB'"]),
        (["--budget", "nan"], ["budget must look like"]),
        (["--budget"], ["--budget: expected one argument"]),
        (["--batch", "-1"], ["max_batch_size must be >= 1, got -1"]),
        (["--batch", "x"], ["--batch: invalid int value: 'x'"]),
        (["--mtp", "-3"], ["max_intermediate_seq_len must be >= 0", "-3"]),
        (["--tp", "5"], ["tp_size 5 must divide recurrent_state_num_heads (24)"]),
    ],
)
def test_plan_refuses_bad_input_in_one_line(args, words):
    assert_one_line_error(cli("plan", "--preset", "mamba2-130m", *args), *words)


def test_plan_refuses_an_unknown_preset_and_command():
    assert_one_line_error(cli("plan", "--preset", "gpt-5"), "invalid choice: 'gpt-5'")
    assert_one_line_error(cli("frobnicate"), "invalid choice: 'frobnicate'")


def test_huge_budget_uses_pib_and_warns():
    result = cli("plan", "--preset", "mamba2-130m", "--budget", "10PiB")
    assert result.returncode == 0, result.stderr
    assert "largest batch within 10.00 PiB (11258999068426240 bytes)" in result.stdout
    assert "warning: the budget of 10.00 PiB per rank exceeds the memory of any single device" in result.stderr


def test_absurd_batch_warns_and_prints_sane_units():
    # 100,000,000 slots x 9,781,248 B = 978,124,800,000,000 B = 889.60 TiB
    result = cli("plan", "--preset", "mamba2-130m", "--batch", "100000000")
    assert result.returncode == 0, result.stderr
    assert "889.60 TiB" in result.stdout
    assert "warning: the cache of 889.60 TiB per rank exceeds the memory of any single device" in result.stderr
    result = cli("plan", "--preset", "mamba2-130m", "--batch", "1000000000000")
    assert "8.48 EiB" in result.stdout and "TiB" not in result.stdout


def test_a_plan_that_fits_has_no_warning():
    result = cli("plan", "--preset", "nemotron-h-8b", "--mtp", "4", "--tp", "2", "--budget", "20GiB")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "per rank: 164" in result.stdout


@pytest.mark.skipif(ON_GPU, reason="checks the message where there is no GPU")
def test_demo_numba_without_a_gpu_says_so():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    assert_one_line_error(cli("demo", "--backend", "numba", env=env), "--backend numba needs a CUDA GPU")


def test_demo_refuses_bad_layers():
    result = subprocess.run(
        [sys.executable, "-m", "mamba_cache.demo", "--backend", "numpy", "--layers", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=300,
    )
    assert_one_line_error(result, "--layers must be >= 1, got 0")
