"""MkDocs hooks: keep the built site self-contained (it is read on air-gapped GPU machines).

``MKDOCS_EXECUTE_ONLY="03,07"`` (comma-separated tutorial numbers) executes only those tutorials: the
test suite's build checks two tutorials' outputs, and tests/test_tutorials.py runs every tutorial anyway.

mkdocs-jupyter's notebook template embeds an inline ``<script type="module">`` that imports Mermaid
from a CDN on every tutorial page. The tutorials draw no Mermaid diagrams, so the script is removed.
"""

import os
import pathlib
import re

_CDN_SCRIPT = re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?https?://(?:(?!</script>).)*?</script>", re.DOTALL | re.I)


def on_post_page(output, page, config):
    """Drop every inline script that loads code from an http(s) URL (mkdocs-jupyter's Mermaid loader)."""
    return _CDN_SCRIPT.sub(lambda m: "" if "src=" not in m.group(0).split(">", 1)[0] else m.group(0), output)


def on_config(config):
    """With ``MKDOCS_EXECUTE_ONLY`` set, tell mkdocs-jupyter not to execute the other tutorials."""
    only = os.environ.get("MKDOCS_EXECUTE_ONLY")
    if only is not None:
        keep = {n.strip() for n in only.split(",")}
        tutorials = pathlib.Path(config["config_file_path"]).parent / "tutorials"
        skip = [p.name for p in sorted(tutorials.glob("[0-9][0-9]-*.py")) if p.name[:2] not in keep]
        config["plugins"]["mkdocs-jupyter"].config["execute_ignore"] = skip
    return config
