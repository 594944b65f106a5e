"""Fixtures: a real kernel server on a loopback socket (in-process thread, port 0) and
clients connected to it through rpyc, exactly as a notebook would connect."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import djinn_nb as dj  # noqa: E402

MODELS = ["tiny-gpt2", pytest.param("smollm2-135m", marks=pytest.mark.smollm2)]
#: a middle layer that exists in both models (tiny-gpt2 has 8 blocks, SmolLM2 30)
MIDDLE = {"tiny-gpt2": 4, "smollm2-135m": 6}


@pytest.fixture(scope="session")
def kernel():
    from kernel_server.server import Kernel
    return Kernel("tiny-gpt2", device=os.environ.get("DJINN_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def server(kernel):
    from kernel_server.server import KernelServer
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    c = dj.connect(server.address)
    yield c
    c.close()


@pytest.fixture(params=MODELS)
def model(request):
    return request.param


@pytest.fixture
def session(client, model):
    s = client.session(model=model)
    yield s
    if not client.closed:
        s.close()
