"""The documentation's own checks that need no build: every public name documented in the API
pages with the docstring sections the reference promises, and every link of the README and the
docs pages pointing at a file. (`make docs` builds the site with warnings as errors and
`make test-docs` runs every example.)"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import svconv
import svconv.nnx
from svconv import _families
from svconv._primitive import Family

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
LINK = re.compile(r"\]\(([^)#\s]+)\)")  # a Markdown link or image to a file (no anchor)
# The tiling classes an op's `block_sizes=` takes: every backend's, from the family records.
TILES = sorted(
    {
        tiles
        for family in vars(_families).values()
        if isinstance(family, Family)
        for backend in family.backends
        for tiles in backend.tiles
    },
    key=lambda c: c.__name__,
)
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts),
]
PUBLIC = [(f"svconv.{n}", getattr(svconv, n)) for n in svconv.__all__] + [
    (f"svconv.nnx.{n}", getattr(svconv.nnx, n)) for n in svconv.nnx.__all__
]


def _documented() -> set[str]:
    """The names the API pages pass to autodoc, qualified by the page's current module."""
    names = set()
    for page in API.glob("*.md"):
        module = ""
        for kind, name in re.findall(r"^\.\. (\w+):: (\S+)", page.read_text(), re.M):
            if kind == "currentmodule":
                module = name
            elif kind.startswith("auto"):
                names.add(name if "." in name else f"{module}.{name}")
    return names


def test_every_public_name_is_in_the_api_reference():
    assert TILES, "no tiling class found in the family records"
    documented = _documented()
    wanted = [n for n, _ in PUBLIC] + [f"{c.__module__}.{c.__name__}" for c in TILES]
    assert [n for n in wanted if n not in documented] == []


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_docstring_has_the_reference_sections(name, obj):
    """Functions say what they take, return and raise; layers what they raise (their
    attributes or constructor arguments in ``Attributes:`` or ``Args:``)."""
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        wanted = ("Raises:",) + (("Args:",) if name.startswith("svconv.nnx.") else ("Attributes:",))
    else:
        wanted = ("Args:", "Returns:", "Raises:")
    assert [s for s in wanted if s not in doc] == []


@pytest.mark.parametrize("tiles", TILES, ids=lambda c: c.__name__)
def test_tilings_document_every_field_and_their_errors(tiles):
    doc = inspect.getdoc(tiles) or ""
    fields = [f.name for f in dataclasses.fields(tiles)]
    assert [f for f in fields if not re.search(rf"\b{f}\b", doc)] == []
    assert "Raises:" in doc


def test_readme_and_docs_links_point_to_committed_files():
    """Every relative link and image of the README and the docs pages names a file of the
    repository (relative to the page), and the README links every family page and guide (that
    every page is in the site's table of contents, `make docs` checks: Sphinx warns)."""
    missing = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert missing == []
    readme = (ROOT / "README.md").read_text()
    assert any(t.startswith("results/") for t in LINK.findall(readme))
    guides = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("[fg]*/*.md"))
    assert guides and [g for g in guides if f"]({g})" not in readme] == []


def test_every_python_example_runs_or_is_pytorch():
    """Python in the README and the docs is a doctest session (```pycon, run by
    `make test-docs`); a plain ```python block is allowed only for PyTorch code shown for
    comparison, which the examples' environment does not have."""
    unrun = []
    for page in PAGES:
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            if "torch" not in block:
                unrun.append(f"{page.relative_to(ROOT)}: {block[:60]!r}")
    assert unrun == []
    sessions = [p for p in PAGES if "```pycon" in p.read_text()]
    assert ROOT / "README.md" in sessions and len(sessions) >= 10
