"""The committed notebooks stay small and clean: no saved widget state (nbconvert and
JupyterLab can store megabytes of it; the outputs that matter are re-made by nbval), no
error outputs, and every code cell executed."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    assert path.stat().st_size < 1 << 20, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, 4)
    assert "widgets" not in nb.metadata, "saved widget state: strip metadata.widgets"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(o.output_type == "error" for o in cell.get("outputs", [])), cell.source[:80]
