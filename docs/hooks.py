"""MkDocs hooks: keep the built site self-contained (it is read on air-gapped GPU machines).

mkdocs-jupyter's notebook template embeds an inline ``<script type="module">`` that imports Mermaid
from a CDN on every tutorial page. The tutorials draw no Mermaid diagrams, so the script is removed.
"""

import re

_CDN_SCRIPT = re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?https?://(?:(?!</script>).)*?</script>", re.DOTALL | re.I)


def on_post_page(output, page, config):
    """Drop every inline script that loads code from an http(s) URL (mkdocs-jupyter's Mermaid loader)."""
    return _CDN_SCRIPT.sub(lambda m: "" if "src=" not in m.group(0).split(">", 1)[0] else m.group(0), output)
