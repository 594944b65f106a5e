"""Sphinx configuration of the djinn_nb API reference (``make docs``).

Built from the docstrings with autodoc and napoleon, with warnings as errors
(``sphinx-build -W --keep-going docs/api build/docs``); tests/process/test_docs.py runs the
same build in CI.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))           # the packages as they are in this checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

project = "djinn_nb"
author = "djinn_nb developers"
copyright = "djinn_nb developers, Apache-2.0"
from djinn_protocol import __version__ as release  # noqa: E402

version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# the client never needs torch; the widgets and plots need their extra, which `make setup`
# installs: nothing is mocked, so a docstring that no longer imports fails the build
napoleon_google_docstring = True
napoleon_numpy_docstring = True
default_role = "code"                   # `x` in a docstring is code, as in Markdown
html_theme = "alabaster"
html_title = f"djinn_nb {release} API"
exclude_patterns = ["_build"]
