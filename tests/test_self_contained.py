"""The repository states its own contract: no file points at notes outside it.

The normative contract lives in ``docs/concepts/contract.md``; a link to a file outside the
repository would rot the moment the repository is copied anywhere.
"""

import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file does not flag itself.
FORBIDDEN = ("../" + "shared", "SEMANTICS" + ".md")


def _repository_files():
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_file_refers_outside_the_repository():
    offenders = []
    for path in _repository_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in FORBIDDEN):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, "link docs/concepts/contract.md instead:\n" + "\n".join(offenders)


def test_the_contract_page_exists_and_readme_links_it():
    assert (ROOT / "docs/concepts/contract.md").is_file()
    assert "](docs/concepts/contract.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
