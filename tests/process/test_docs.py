"""The API reference builds from the docstrings with no warning (``make docs``, the same
command): a docstring that Sphinx cannot read, or an API name that no longer imports,
fails here and so in CI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_builds_without_warnings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          "-d", str(tmp_path / "doctrees"), "docs/api", str(tmp_path / "html")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    page = (tmp_path / "html" / "index.html").read_text()
    for name in ("djinn_nb.connect", "djinn_nb.Client", "djinn_nb.Session.generate",
                 "djinn_nb.Session.checkpoint", "djinn_nb.Checkpoint", "djinn_nb.Pool",
                 "djinn_nb.Finished", "djinn_nb.divergence", "djinn_nb.DjinnError",
                 "djinn_nb.plots.divergence", "djinn_nb.experiments.run"):
        assert f'id="{name}"' in page, f"{name} is missing from the API reference"
