"""The documentation site: a strict build, internal links, offline assets, and a browser look.

The build renders every tutorial (mkdocs-jupyter; here it executes only 03 and 07, whose outputs
the tests check: tests/test_tutorials.py runs every tutorial as a script, and `make docs` executes
them all) and the API reference from the docstrings (mkdocstrings); ``mkdocs build --strict`` fails
on a broken link, a missing anchor or a docstring the reference cannot render. Headless Chromium
(Debian's ``chromium``, which ``.ci/run`` installs) then renders the main pages.
"""

import functools
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser

import pytest

pytest.importorskip("mkdocs_jupyter", reason="the docs extra is not installed (pip install -e '.[docs]')")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN_PAGES = [
    "index.html",
    "concepts/states/index.html",
    "concepts/layouts/index.html",
    "concepts/mtp/index.html",
    "tutorials/03-speculative-decoding/index.html",
    "api/index.html",
    "api/managers/index.html",
]


#: The pages also drawn to a screenshot (a DOM dump checks the others; each launch costs seconds).
SCREENSHOT_PAGES = ("index.html", "concepts/states/index.html", "tutorials/03-speculative-decoding/index.html")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", MKDOCS_EXECUTE_ONLY="03,07")  # the two whose output is checked
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return out


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.scripts, self._in_script = [], set(), [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("href", "src"):
            if attrs.get(key):
                self.refs.append((tag, attrs[key], attrs.get("rel") or ""))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:  # the body of an inline script
            self.scripts[-1] += data


@functools.cache
def parse(path):
    parser = _Refs()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_every_internal_link_resolves(site):
    broken = []
    for page in site.rglob("*.html"):
        refs = parse(page)
        for _tag, ref, _ in refs.refs:
            if re.match(r"^[a-z]+:", ref) or ref.startswith("//"):
                continue
            path, _, anchor = ref.partition("#")
            path = path.partition("?")[0]
            if path.startswith("/"):  # 404.html links from the site root
                target = site / path.lstrip("/")
            else:
                target = (page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {ref}")
            elif anchor and target.suffix == ".html" and anchor not in parse(target).ids:
                broken.append(f"{page.relative_to(site)}: {ref} (no such anchor)")
    assert not broken, "\n".join(broken[:20])


def test_nothing_is_fetched_from_the_internet(site):
    """Air-gapped GPU boxes: no fonts, scripts, styles or images from a CDN."""
    external = []
    for page in site.rglob("*.html"):
        for tag, ref, rel in parse(page).refs:
            loads = tag in ("script", "img", "iframe", "source") or (
                tag == "link" and rel in ("stylesheet", "preload", "icon")
            )
            if loads and re.match(r"^(https?:)?//", ref):
                external.append(f"{page.relative_to(site)}: <{tag}> {ref}")
        for body in parse(page).scripts:  # inline scripts that import code (mkdocs-jupyter's Mermaid loader did)
            for url in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\"`)]*", body):
                external.append(f"{page.relative_to(site)}: inline <script> loads {url}")
    css = "\n".join(p.read_text(errors="ignore") for p in site.rglob("*.css"))
    assert "fonts.googleapis" not in css
    assert not external, "\n".join(external[:20])


def test_diagrams_tutorial_output_and_api_reference_are_built(site):
    layouts = (site / "concepts/layouts/index.html").read_text()
    assert "layouts.svg" in layouts and (site / "img/layouts.svg").exists()
    assert "mtp-cycle.svg" in (site / "concepts/mtp/index.html").read_text()
    states = (site / "concepts/states/index.html").read_text()
    for svg in ("mamba2-recurrence.svg", "conv-window.svg", "gdn-recurrence.svg"):
        assert svg in states and (site / "img" / svg).exists(), svg
    for page in ("contract", "porting"):
        assert (site / f"concepts/{page}/index.html").exists(), page
    tutorial = (site / "tutorials/03-speculative-decoding/index.html").read_text()
    assert "speculative == sequential, bit for bit: True" in tutorial  # executed output, not just code
    assert "speculative tokens == plain greedy tokens: True" in tutorial
    api = {
        "managers": ("NumpyMambaCacheManager", "NumbaMambaCacheManager", "scatter_mtp_states", "replay_mtp_states"),
        "config": ("ConfigError", "format_bytes"),
        "prefix": ("PrefixStateCache", "PrefixHandle", "block_digests"),
        "replay": ("mamba_cache.replay.reference",),
        "precision": ("stochastic", "rounding_bits"),
        "models": ("TinyMamba2", "TinyGatedDeltaNet"),
        "snapshots": ("save_snapshot",),
        "internals/core-kernels": ("scatter_accepted",),
        "internals/replay-kernels": ("round_state",),
        "internals/replay-tiled": ("mamba2_tiles",),
    }
    overview = (site / "api/index.html").read_text().partition("<article")[2]  # the page body, not the nav
    for page, names in api.items():
        html = (site / f"api/{page}/index.html").read_text()
        for name in names:
            assert name in html, f"api/{page}: {name}"
        assert f'href="{page}/"' in overview, f"the API overview does not link api/{page}"
    # the public pages come first and carry no kernel internals
    assert "mamba_cache.core.kernels" not in (site / "api/managers/index.html").read_text()


def test_home_page_leads_to_every_capability_and_its_example_is_short(site):
    body = (site / "index.html").read_text(encoding="utf-8").partition("<article")[2]  # not the nav
    for page in ("prefix", "replay", "precision", "glossary"):
        assert f'href="concepts/{page}/"' in body, f"the home page does not link concepts/{page}"
    for words in ("prefix store", "replay commit", "stochastic rounding", "mixed dtypes"):
        assert words in body.lower(), words
    source = (ROOT / "docs/index.md").read_text(encoding="utf-8")
    example = source.partition("## Ten lines")[2].partition("```python\n")[2].partition("```")[0]
    assert example and len([line for line in example.splitlines() if line.strip()]) <= 10, example


def test_tutorial_code_and_output_wrap_at_whitespace_and_are_shown_whole(site):
    css = (site / "stylesheets/extra.css").read_text(encoding="utf-8")
    assert "overflow-wrap: anywhere" not in css and "word-break: break-all" not in css
    assert re.search(r"outputsScrolled[^{]*\{[^}]*max-height: none", css, re.S)
    tutorial = (site / "tutorials/07-prefix-cache/index.html").read_text(encoding="utf-8")
    assert "hit_rate=" in tutorial  # executed output, shown whole by the rules above


# A reST role (":func:`x`") or a reST literal-block marker ("text::") left in a docstring or a page:
# mkdocstrings reads Markdown, so either would be printed as it stands.
_REST_ROLE = re.compile(r"(?<![\w:-]):(?:meth|class|func|attr|mod|data|obj|exc|ref|py:\w+):(?=`|<code>)")
_REST_LITERAL = re.compile(r"::\s*</p>")


def test_no_rest_markup_is_rendered(site):
    found = []
    for page in sorted(site.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        for match in [*_REST_ROLE.finditer(html), *_REST_LITERAL.finditer(html)]:
            found.append(f"{page.relative_to(site)}: ...{html[max(0, match.start() - 60) : match.end() + 40]!r}")
    assert not found, f"{len(found)} reST roles or '::' markers rendered as text:\n" + "\n".join(found[:20])


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_pages_render_in_headless_chromium(site, tmp_path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    chromium = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=3000",
    ]
    doms = {}
    try:
        for page in MAIN_PAGES:
            dom = subprocess.run([*chromium, "--dump-dom", base + page], capture_output=True, text=True, timeout=120)
            assert dom.returncode == 0, dom.stderr[-2000:]
            assert "<article" in dom.stdout and "mamba_cache" in dom.stdout, page
            doms[page] = dom.stdout
            if page not in SCREENSHOT_PAGES:
                continue
            shot = tmp_path / (page.replace("/", "_") + ".png")
            subprocess.run(
                [*chromium, "--window-size=1280,1600", f"--screenshot={shot}", base + page],
                capture_output=True,
                timeout=120,
                check=True,
            )
            assert shot.stat().st_size > 10_000, page
        assert re.search(r"<img[^>]+layouts\.svg", doms["concepts/layouts/index.html"])
        assert "bit for bit: True" in doms["tutorials/03-speculative-decoding/index.html"]
        if os.environ.get("MAMBA_CACHE_SCREENSHOTS"):
            dest = pathlib.Path(os.environ["MAMBA_CACHE_SCREENSHOTS"])
            dest.mkdir(parents=True, exist_ok=True)
            for png in tmp_path.glob("*.png"):
                shutil.copy(png, dest / png.name)
    finally:
        server.shutdown()
        server.server_close()
