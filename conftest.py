"""Repository-wide pytest hooks: notebooks run on the embedded SmolLM2 weights, so they
carry the ``smollm2`` marker (``make test-fast`` leaves them out)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.smollm2)
