"""Fixtures: a real kernel server on a loopback socket (in-process thread, port 0) and
clients connected to it through rpyc, exactly as a notebook would connect."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import djinn_nb as dj  # noqa: E402

#: "tiny-llama" is a random-init Llama saved to a temporary directory and loaded by path
MODELS = ["tiny-gpt2", "tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.smollm2)]
#: the layer the exactness tests pause and steer at (SmolLM2: 6, as in the study)
MIDDLE = {"tiny-gpt2": 4, "tiny-llama": 2, "smollm2-135m": 6}


@pytest.fixture(scope="session")
def kernel():
    from kernel_server.kernel import Kernel
    return Kernel("tiny-gpt2", device=os.environ.get("DJINN_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def server(kernel):
    from kernel_server.transport.server import KernelServer
    srv = KernelServer(kernel, "127.0.0.1", 0).start()
    yield srv
    srv.close()


@pytest.fixture
def client(server):
    c = dj.connect(server.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A seeded random-init Llama (SmolLM2's shape when DJINN_TEST_LLAMA=smollm2-shape,
    else 4 small layers) with the tiny tokenizer, saved as a local model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from kernel_server.model.loading import tiny_tokenizer
    tok = tiny_tokenizer()
    shape = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2)
    if os.environ.get("DJINN_TEST_LLAMA") == "smollm2-shape":
        shape = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **shape))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(params=MODELS)
def model(request):
    return request.param


@pytest.fixture
def session(client, model, request):
    name = request.getfixturevalue("tiny_llama_path") if model == "tiny-llama" else model
    s = client.session(model=name)
    yield s
    if not client.closed:
        s.close()
