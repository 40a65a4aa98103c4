"""Sphinx configuration of the musco-core documentation.

Build: ``make docs`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``). Pages are MyST
Markdown; their ``>>>`` examples are run by pytest (``--doctest-glob='*.md'``, see ``docs/conftest.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import musco_core  # the package must be installed (make install, or pip install -e .)

project = "musco-core"
author = "the musco-core authors"
copyright = "the musco-core authors"
release = musco_core.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "musco_schedule_doc",  # docs/_ext: schedule reference tables generated from the attrs classes
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "conftest.py", "Thumbs.db", ".DS_Store"]

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# API reference: signatures stay short; the types go into the parameter descriptions.
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False  # no torch.nn.Module boilerplate on FactorizedLayer
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False

# `# doctest: +ELLIPSIS` and friends are for pytest; hide them in the rendered pages.
trim_doctest_flags = True
highlight_language = "python"
pygments_style = "sphinx"

html_theme = "alabaster"
html_title = f"musco-core {release}"
html_theme_options = {
    "description": "Multi-stage low-rank compression of PyTorch networks",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_static_path: list[str] = []
