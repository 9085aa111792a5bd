"""Sphinx configuration of svconv's documentation (``make docs``; warnings are errors)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import svconv  # noqa: E402

project = "svconv"
author = "the svconv developers"
copyright = "2026, the svconv developers"
release = svconv.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "conftest.py", "README.md"]
root_doc = "index"

# MyST: $...$ and $$...$$ maths, ::: fences, definition lists, anchors on headings.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The docstrings are Google style (Args/Returns/Raises).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True}
add_module_names = False

# Every reference to svconv's own names must resolve (a renamed function breaks the build); the
# names of JAX, Flax and the standard library are not linked (no network at build time).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|numpy|np|typing|collections|optax)(\..*)?"),
]

# The examples are doctest sessions: the copy button copies the code without prompts or output.
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True

html_theme = "furo"
html_title = f"svconv {release}"
pygments_style = "sphinx"
