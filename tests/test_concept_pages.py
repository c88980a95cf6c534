"""The Python examples of the concept pages run and their asserts hold (docs cannot rot)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "concepts"
BLOCKS = [
    pytest.param(block, id=f"{page.stem}-{n}")
    for page in sorted(DOCS.glob("*.md"))
    for n, block in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M))
    if page.stem in ("states", "strategies")
]


def test_the_states_page_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS)
def test_example_runs(block):
    exec(compile(block, "<docs example>", "exec"), {"__name__": "docs_example"})
