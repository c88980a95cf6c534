"""The command line as a newcomer meets it: bad input is one line on stderr and exit status 2, printed
before anything else; absurd sizes get units that fit and a warning."""

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys

import pytest
from helpers import ON_GPU

from mamba_cache.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_process(*args, env=None):
    """``python -m mamba_cache.cli ARGS`` in a fresh process: the real entry point and its exit status."""
    env = dict(os.environ if env is None else env, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mamba_cache.cli", *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )


def cli(*args):
    """The same call in this process (``main`` with stdout / stderr captured): a fraction of a process start.

    ``main`` returns the exit status or raises ``SystemExit`` with it (argparse's errors), as the
    entry point's ``sys.exit(main())`` passes on; `cli_process` proves that path end to end.
    """
    from mamba_cache.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(["mamba-cache", *args], code or 0, out.getvalue(), err.getvalue())


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
        (["--budget", "20XB"], ["argument --budget: value must be a number and a unit, e.g. 20GiB", "'20XB'"]),
        (["--budget", "1e30B"], ["argument --budget", "at most 16 EiB", "'1e30B'"]),
        (["--budget", "-5GiB"], ["argument --budget: value must be >= 0", "'-5GiB'"]),
        (["--budget", "nan"], ["argument --budget: value must be a number and a unit"]),
        (["--budget"], ["--budget: expected one argument"]),
        (["--commit-mode", "rewind"], ["--commit-mode: invalid choice: 'rewind'", "'scatter', 'replay', 'checkpoint'"]),
        (["--commit-mode", "checkpoint"], ["max_intermediate_seq_len must be >= 1", "commit_mode='checkpoint'"]),
        (["--batch", "-1"], ["max_batch_size must be >= 1, got -1"]),
        (["--batch", "x"], ["--batch: invalid int value: 'x'"]),
        (["--mtp", "-3"], ["max_intermediate_seq_len must be >= 0", "-3"]),
        (["--tp", "5"], ["tp_size 5 must divide recurrent_state_num_heads (24)"]),
    ],
)
def test_plan_refuses_bad_input_in_one_line(args, words):
    assert_one_line_error(cli("plan", "--preset", "mamba2-130m", *args), *words)


@pytest.mark.parametrize("bare", ["12", "1000", "1e12", "0", "20 "])
def test_plan_refuses_a_size_without_a_unit(bare):
    # A bare number was read as bytes (--budget 12: 12 bytes, batch 0, exit 0); it is refused now.
    assert_one_line_error(
        cli("plan", "--preset", "mamba2-130m", "--budget", bare),
        f"argument --budget: value '{bare.strip()}' has no unit",
        "B, KB, MB, GB, TB",
        "KiB, MiB, GiB, TiB",
    )


def test_plan_refuses_a_size_without_a_unit_in_process(capsys):
    from mamba_cache.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--preset", "mamba2-130m", "--budget", "12"])
    assert exit_.value.code == 2 and "has no unit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("12GB", 12 * 10**9),
        ("12 gb", 12 * 10**9),
        ("12GiB", 12 * 2**30),
        ("12 kib", 12 * 2**10),
        ("1.5tb", 15 * 10**11),
    ],
)
def test_plan_budget_grammar(text, nbytes, capsys):
    from mamba_cache.cli import main

    assert main(["plan", "--preset", "mamba2-130m", "--budget", text]) == 0
    out = capsys.readouterr().out
    assert f"({nbytes} bytes) per rank: {nbytes // 9_781_248}" in out  # 9,781,248 B per sequence


def test_plan_refuses_an_unknown_preset_and_command():
    # through the real entry point once: exit status 2, one line on stderr, nothing on stdout
    assert_one_line_error(cli_process("plan", "--preset", "gpt-5"), "invalid choice: 'gpt-5'")
    assert_one_line_error(cli("frobnicate"), "invalid choice: 'frobnicate'")


def test_a_warning_and_a_table_through_the_entry_point():
    result = cli_process("plan", "--preset", "mamba2-130m", "--budget", "10PiB")
    assert result.returncode == 0 and "largest batch within 10.00 PiB" in result.stdout, result
    assert result.stderr.startswith("mamba-cache plan: warning:"), result.stderr


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
    assert_one_line_error(cli_process("demo", "--backend", "numba", env=env), "--backend numba needs a CUDA GPU")


def test_demo_refuses_bad_layers():
    result = subprocess.run(
        [sys.executable, "-m", "mamba_cache.demo", "--backend", "numpy", "--layers", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=300,
    )
    assert_one_line_error(result, "--layers must be >= 1, got 0")


def plan_lines(capsys, *args):
    from mamba_cache.cli import main

    assert main(["plan", *args]) == 0
    return capsys.readouterr().out.splitlines()


def table_dtypes(lines):
    """The dtype column of the recurrent and conv rows of the pool table."""
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["recurrent"], ["conv"])}
    return rows["recurrent"][-3], rows["conv"][-3]


@pytest.mark.parametrize(
    "dtype_args",
    [[], ["--dtype", "float32"], ["--recurrent-dtype", "bfloat16"], ["--dtype", "float16", "--conv-dtype", "float64"]],
)
@pytest.mark.parametrize("preset", ["nemotron-h-8b", "qwen3-next-80b-a3b"])
def test_plan_header_states_the_dtypes_of_its_table(preset, dtype_args, capsys):
    # The header said "shipped state dtypes: recurrent float32" above a float16 table (issue #23).
    lines = plan_lines(capsys, "--preset", preset, *dtype_args)
    text = " ".join(" ".join(lines).split())
    recurrent, conv = table_dtypes(lines)
    assert f"state dtypes of this plan: recurrent {recurrent}, conv {conv}" in text
    shipped_recurrent, shipped_conv = PRESETS[preset].shipped_dtypes
    assert (shipped_recurrent, shipped_conv) != (recurrent, conv)
    assert f"shipped state dtypes, not this plan's: recurrent {shipped_recurrent}, conv {shipped_conv}" in text
    assert text.count("shipped") == 1  # no line claims the table's dtypes are the shipped ones
    assert ("as given" in text) == bool(dtype_args)


def test_plan_header_says_so_when_the_table_is_in_the_shipped_dtypes(capsys, monkeypatch):
    import dataclasses

    from mamba_cache import cli

    shipped = dataclasses.replace(PRESETS["nemotron-h-8b"], shipped_dtypes=("float32", "float16"))
    monkeypatch.setitem(cli.PRESETS, "nemotron-h-8b", shipped)
    lines = plan_lines(capsys, "--preset", "nemotron-h-8b", "--recurrent-dtype", "float32")
    assert table_dtypes(lines) == ("float32", "float16")
    assert "  (the model's shipped state dtypes)" in lines and "not this plan's" not in "\n".join(lines)


def every_output():
    """Every listing and a plan of every preset with every section (MTP, both modes, budget, prefix)."""
    yield ["presets"]
    for name in PRESETS:
        for mode in ("scatter", "replay"):
            yield ["plan", "--preset", name, "--mtp", "4", "--commit-mode", mode, "--budget", "80GB"]
        yield ["plan", "--preset", name, "--batch", "1000000", "--prefix-entries", "64", "--host-entries", "512"]


def test_no_output_line_is_a_wall(capsys):
    from mamba_cache.cli import main

    longest = 0
    for args in every_output():
        assert main(args) == 0, args
        for line in capsys.readouterr().out.splitlines():
            assert len(line) <= 100, (args, line)
            longest = max(longest, len(line))
    assert longest > 80  # the check sees the wide lines (the tables, the wrapped sources)


def test_presets_lists_each_preset_in_short_lines(capsys):
    from mamba_cache.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"\n{name}: " in f"\n{out}"
        assert f"{preset.mixer}, {preset.num_recurrent_layers} recurrent layers" in out
        assert f"{preset.n_groups} group" in out


def commit_mode_rows(lines):
    start = next(i for i, line in enumerate(lines) if line.startswith("commit mode "))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith(("* ", "  ")):
            break
        cells = [c.strip() for c in line[2:].split("  ") if c.strip()]
        rows[cells[0].split()[0]] = cells
    return lines[start], rows


def test_plan_commit_mode_replay_by_hand(capsys):
    # Nemotron-H-8B, TP 2, batch 8, MTP 4, per rank: H 64, D 64, N 128, G 4, C 5120 float16.
    # Stash per row and step: dA 64 x 4 + u 64 x 64 x 4 + B 4 x 128 x 4 + conv 5120 x 2 = 28,928 B;
    # x 24 layers x 8 rows x 4 steps = 22,216,704 B = 21.19 MiB. Main pools 209,190,912 B (199.50 MiB).
    # Per sequence 26,148,864 + 2,777,088 = 28,925,952 B: 20 GiB fits 742 (scatter: 130,744,320 B, 164).
    args = ["--preset", "nemotron-h-8b", "--batch", "8", "--mtp", "4", "--tp", "2", "--budget", "20GiB"]
    lines = plan_lines(capsys, *args, "--commit-mode", "replay")
    text = "\n".join(lines)
    assert "intermediate_recurrent" not in text and "replay_stash" in text  # the pools of replay mode
    assert "dA [64] float32, u [64, 64] float32, B [4, 128] float32, conv [5120] float16" in " ".join(text.split())
    header, rows = commit_mode_rows(lines)
    assert "batch in 20.00 GiB" in header
    assert rows["replay"] == ["replay", "199.50 MiB", "21.19 MiB", "220.69 MiB", "27.59 MiB", "742"]
    assert rows["scatter"] == ["scatter", "199.50 MiB", "798.00 MiB", "997.50 MiB", "124.69 MiB", "164"]
    assert "\n* replay " in text and "\n  scatter " in text  # the mode of the pool table
    assert "per-step buffers: scatter per-step states, replay stash" in text
    assert "largest batch within 20.00 GiB (21474836480 bytes) per rank: 742" in text
    assert "replay stash / scatter per-step states: 0.0266" in text
    scatter = plan_lines(capsys, *args)  # the default mode: scatter's pools, the same comparison
    assert "intermediate_recurrent" in "\n".join(scatter) and "per rank: 164" in "\n".join(scatter)
    assert commit_mode_rows(scatter)[1] == rows


def test_plan_commit_mode_checkpoint_by_hand(capsys):
    # As the replay case above, with R = S = 4: the ring is the stash's 22,216,704 B plus 12 B of counters
    # per slot (8 x 12 = 96): 22,216,800 B = 21.19 MiB; per sequence 28,925,952 + 12 = 28,925,964 B.
    args = ["--preset", "nemotron-h-8b", "--batch", "8", "--mtp", "4", "--tp", "2", "--budget", "20GiB"]
    lines = plan_lines(capsys, *args, "--commit-mode", "checkpoint")
    text = "\n".join(lines)
    assert "replay_stash" not in text and "intermediate_recurrent" not in text and "history " in text
    assert "history ring (R = 4) per slot and step (mamba2): dA [64] float32" in " ".join(text.split())
    _, rows = commit_mode_rows(lines)
    assert rows["checkpoint"] == ["checkpoint", "199.50 MiB", "21.19 MiB", "220.69 MiB", "27.59 MiB", "742"]
    assert "per sequence (one slot, every pool): 27.59 MiB (28925964 bytes)" in text
    assert "\n* checkpoint " in text and "\n  replay " in text


def test_plan_commit_mode_replay_gdn_by_hand(capsys):
    # Qwen3-Next, batch 32, MTP 4: g 32 x 4 + beta 32 x 4 + k 16 x 128 x 4 + v 32 x 128 x 4 + conv 8192 x 2
    # = 41,216 B per row and step; x 36 layers x 32 rows x 4 steps = 189,923,328 B = 181.12 MiB.
    lines = plan_lines(
        capsys, "--preset", "qwen3-next-80b-a3b", "--batch", "32", "--mtp", "4", "--commit-mode", "replay"
    )
    assert "g [32] float32, beta [32] float32, k [16, 128] float32, v [32, 128] float32" in " ".join(
        " ".join(lines).split()
    )
    _, rows = commit_mode_rows(lines)
    assert rows["replay"][2] == "181.12 MiB" and rows["scatter"][2] == "9.28 GiB"
    assert len(rows["replay"]) == 5  # no budget, no batch column


def test_every_commit_mode_is_offered_and_compared(capsys):
    from mamba_cache._config import COMMIT_MODES
    from mamba_cache.cli import PER_STEP_BUFFERS

    assert tuple(PER_STEP_BUFFERS) == COMMIT_MODES  # a new Config mode needs its entry here
    _, rows = commit_mode_rows(plan_lines(capsys, "--preset", "mamba2-130m", "--mtp", "2"))
    assert tuple(rows) == COMMIT_MODES
    lines = plan_lines(capsys, "--preset", "mamba2-130m")  # no MTP: no per-step buffers to compare
    assert not any(line.startswith("commit mode ") for line in lines)


@pytest.mark.parametrize("name", ["nemotron-h-8b", "qwen3-next-80b-a3b"])
@pytest.mark.parametrize(("mtp", "mode"), [(0, "decode"), (4, "scatter")])
def test_8bit_capacity_is_at_least_1_9x_bfloat16(name, mtp, mode):
    """Issue #26's memory target: 8-bit states (scales included) fit >= 1.9x the sequences bfloat16 fits."""
    from mamba_cache.precision import QUANT8_DTYPE_NAMES
    from mamba_cache.presets import capacity_config, capacity_table

    preset = PRESETS[name]
    table = capacity_table(preset, 80 * 10**9, mtp=mtp)
    bf16 = capacity_config(preset, "bfloat16", "scatter", mtp)
    for dtype in QUANT8_DTYPE_NAMES:
        assert table[dtype][mode] >= 1.9 * table["bfloat16"][mode], (dtype, table[dtype][mode])
        # the bytes by hand: one byte an element, and a float32 scale per N recurrent / 64 conv elements
        config = capacity_config(preset, dtype, "scatter", mtp)
        rec, conv = (
            config.num_recurrent_layers * config.recurrent_slot_elems,
            config.num_recurrent_layers * config.conv_slot_elems,
        )
        per_step = max(1, mtp) if mtp else 0
        hand = (rec + conv) * (1 + per_step) + 4 * (rec // config.recurrent_state_size + conv // 64) * (1 + per_step)
        assert config.slot_bytes == hand and bf16.slot_bytes == 2 * (rec + conv) * (1 + per_step)


def test_plan_budget_shows_every_dtype_and_mode_and_says_when_nothing_fits(capsys):
    from mamba_cache.presets import CAPACITY_DTYPES, FEEDBACK_ROW

    for name in PRESETS:
        lines = plan_lines(capsys, "--preset", name, "--mtp", "2", "--budget", "1MiB")
        start = lines.index(next(line for line in lines if line.startswith("state dtype  ")))
        assert lines[start].split()[2:] == ["scatter", "replay", "checkpoint"]
        rows = [re.split(r"\s{2,}", line) for line in lines[start + 2 : start + 2 + len(CAPACITY_DTYPES) + 1]]
        assert [row[0] for row in rows] == [*CAPACITY_DTYPES, FEEDBACK_ROW]
        assert all(row[1:] == ["0", "0", "0"] for row in rows), rows
        assert any(line.startswith("nothing fits: one sequence needs") for line in lines), name
        assert any(line.startswith("nothing fits: the smallest sequence") for line in lines), name
    lines = plan_lines(capsys, "--preset", "mamba2-130m", "--budget", "80GB")
    assert "nothing fits" not in "\n".join(lines)
    int8 = next(line for line in lines if line.startswith("int8 "))
    assert int8.split()[1].isdigit() and int(int8.split()[1]) > 0 and "x)" in int8


def test_commit_mode_table_counts_8bit_scales_with_the_main_pools(capsys):
    from mamba_cache._config import format_bytes

    lines = plan_lines(capsys, "--preset", "nemotron-h-8b", "--mtp", "2", "--recurrent-dtype", "int8")
    config = dataclasses.replace(
        PRESETS["nemotron-h-8b"].config(8, 2, commit_mode="replay"),
        recurrent_state_dtype="int8",
        intermediate_recurrent_state_dtype=None,
    )
    pools = config.pool_bytes()
    replay = next(line for line in lines if line.split()[:1] == ["replay"])
    main = pools["recurrent"] + pools["conv"] + pools["scales"]
    assert re.split(r"\s{2,}", replay.strip())[1:3] == [format_bytes(main), format_bytes(pools["replay_stash"])]


def transcripts(page: str) -> list[tuple[list[str], str]]:
    """Each ``$ mamba-cache ...`` transcript of a docs page: (its arguments, the output shown under it)."""
    import shlex

    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    found = []
    for block in re.findall(r"```text\n(\$ mamba-cache .*?)```", text, re.S):
        lines = block.splitlines()
        command = lines.pop(0)
        while command.endswith("\\"):
            command = command[:-1] + lines.pop(0)
        found.append((shlex.split(command)[2:], "\n".join(lines) + "\n"))
    return found


@pytest.mark.parametrize("page", ["docs/concepts/beyond.md"])
def test_the_plan_transcripts_on_the_pages_are_what_the_cli_prints(page):
    # a transcript on a page is the output of its command today, not of an older CLI
    shown = transcripts(page)
    assert shown, f"no mamba-cache transcript on {page}"
    for args, output in shown:
        result = cli(*args)
        assert result.returncode == 0 and result.stderr == "", result
        assert result.stdout == output, f"{page}: `mamba-cache {' '.join(args)}` prints:\n{result.stdout}"
