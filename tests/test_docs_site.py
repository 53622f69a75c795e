"""The documentation site (mkdocs.yml) builds with ``mkdocs build --strict``: every page of docs/ is
in the navigation, links within the site and their anchors resolve, the API reference renders
every name the packages export, and griffe has nothing to say about the docstrings.

The build is offline (no theme fonts, no remote inventories, no plugin that downloads) and takes a
few seconds; it runs once for the whole module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("mkdocs", reason="the documentation site needs the test extra: pip install -e '.[test]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the API reference needs mkdocstrings[python]")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

#: Exported names without a docstring, which the API reference therefore leaves out. Give the
#: object a docstring (a ``#:`` comment above a module attribute) and take its name off this list.
UNDOCUMENTED_EXPORTS: set[str] = set()

#: Where the packages rendered by the API reference live (the handler's ``paths`` in mkdocs.yml).
SOURCE_ROOTS = [ROOT, ROOT / "encoders", ROOT / "injectors", ROOT / "plugins" / "easyref", ROOT / "plugins" / "metrics", ROOT / "plugins" / "example"]


class _TolerantLoader(yaml.SafeLoader):
    """Reads mkdocs.yml without constructing its tags (``!ENV``, ``!!python/name:``)."""


_TolerantLoader.add_multi_constructor("", lambda loader, suffix, node: None)
_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_TolerantLoader)


def nav_pages(nav) -> list[str]:
    """Every page path of a mkdocs nav, at any depth."""
    if isinstance(nav, str):
        return [] if "://" in nav else [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    """``mkdocs build --strict`` into a temporary folder: the folder and mkdocs' output."""
    site_dir = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed (exit {result.returncode}):\n{output}", pytrace=False)
    return site_dir, output


def test_mkdocs_build_strict(site):
    _, output = site
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "mkdocs build reported:\n" + "\n".join(warnings)


def test_links_not_in_the_site_leave_docs(site):
    """mkdocs.yml reports a link whose target is not a page at INFO level, for the links to
    repository files outside docs/ (../benchmarks/README.md); any other such link is broken."""
    _, output = site
    broken = []
    for page, target in re.findall(r"Doc file '([^']+)' contains a link '([^']+)', but the target", output):
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#", 1)[0]))
        if not resolved.startswith(".." + os.sep) and resolved != "..":
            broken.append(f"docs/{page} -> {target}")
    unrecognized = re.findall(r"Doc file '[^']+' contains an unrecognized relative link '[^']+'", output)
    assert not broken + unrecognized, f"links to nothing within the site: {broken + unrecognized}"


def test_every_docs_page_is_in_the_nav():
    nav = nav_pages(mkdocs_config()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    missing = [page for page in pages if page not in nav]
    assert not missing, f"pages of docs/ missing from the nav of mkdocs.yml: {missing}"
    stale = [page for page in nav if not (DOCS / page).is_file()]
    assert not stale, f"the nav of mkdocs.yml names pages that do not exist: {stale}"


def test_api_reference_renders_every_export(site):
    """Each ``::: module`` of docs/api renders every name of the module's ``__all__``; a name the
    page leaves out (mkdocstrings skips objects without a docstring) counts if another API page
    renders the object under its canonical path."""
    import griffe

    site_dir, _ = site
    anchors: dict[str, set[str]] = {}
    directives: dict[str, list[str]] = {}
    for page in sorted(API.glob("*.md")):
        html = site_dir / "api" / ("" if page.stem == "index" else page.stem) / "index.html"
        anchors[page.name] = set(re.findall(r'\bid="([\w.]+)"', html.read_text(encoding="utf-8")))
        directives[page.name] = re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert any(directives.values()), "docs/api has no ::: directive"
    everywhere = set().union(*anchors.values())
    loader = griffe.GriffeLoader(search_paths=[str(root) for root in SOURCE_ROOTS])
    missing = []
    for page, modules in directives.items():
        for path in modules:
            module = loader.load(path)
            for name in module.exports or []:
                name = name if isinstance(name, str) else name.name
                if f"{path}.{name}" in anchors[page] or f"{path}.{name}" in UNDOCUMENTED_EXPORTS:
                    continue
                try:
                    canonical = module[name].canonical_path
                except (griffe.AliasResolutionError, KeyError):
                    canonical = None
                if canonical not in everywhere:
                    missing.append(f"{path}.{name} (docs/api/{page})")
    assert not missing, (
        f"exported but not in the API reference: {missing}. mkdocstrings leaves out objects without a "
        "docstring: give each one a docstring (a `#:` comment above a module attribute)."
    )
