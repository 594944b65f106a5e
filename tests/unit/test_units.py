"""Unit tests of the pieces below the connection: wire codec, edits, layer discovery."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import djinn_nb as dj
from djinn_protocol import wire
from kernel_server.model.interventions import EditOp, apply_edit
from kernel_server.model.registry import find_layers


@given(hnp.arrays(dtype=st.sampled_from(["float32", "float16", "int64", "bool", "uint8"]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
@settings(max_examples=60, deadline=None)
def test_wire_round_trips_arrays(array):
    out = wire.unpack(wire.pack({"a": array, "nested": [array, {"x": 1}]}))
    for got in (out["a"], out["nested"][0]):
        assert got.dtype == array.dtype and got.shape == array.shape
        assert np.array_equal(got, array, equal_nan=array.dtype.kind == "f")
    assert out["nested"][1] == {"x": 1}


def test_wire_refuses_bad_payloads():
    text, blobs = wire.pack({"a": np.zeros(4, dtype=np.float32)})
    with pytest.raises(dj.InvalidArgumentError, match="needs 16 bytes"):
        wire.unpack((text, (b"\0" * 15,)))
    for bad in [None, "x", (text,), (text, [b""]), (1, ()), (text, ("s",)), ("{nope", ())]:
        with pytest.raises(dj.InvalidArgumentError):
            wire.unpack(bad)
    with pytest.raises(dj.InvalidArgumentError, match="complex"):
        wire.pack(np.zeros(2, dtype=np.complex64))
    with pytest.raises(dj.InvalidArgumentError, match="cannot be sent"):
        wire.pack(object())
    bad_ref = ('{"__ndarray__": 3, "dtype": "float32", "shape": [1]}', ())
    with pytest.raises(dj.InvalidArgumentError, match="out of range"):
        wire.unpack(bad_ref)


def test_apply_edit_semantics():
    h = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 6, 4)[:, :6]
    assert torch.equal(apply_edit(h, EditOp("scale", scale=1.0), 0), h)
    assert torch.equal(apply_edit(h, EditOp("scale", scale=0.5), 0), h * 0.5)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    last = apply_edit(h, EditOp("add", alpha=2.0, vector=v, positions="last"), 10)
    assert torch.equal(last[:, :-1], h[:, :-1]) and torch.equal(last[0, -1], h[0, -1] + 2 * v)
    # absolute positions: chunk starts at 10, so position 12 is row 2; 99 is outside
    rows = torch.stack([v, -v])
    out = apply_edit(h, EditOp("set", vector=rows, positions=(12, 99)), 10)
    assert torch.equal(out[0, 2], v) and torch.equal(out[0, :2], h[0, :2])
    assert torch.equal(out[0, 3:], h[0, 3:])
    assert apply_edit(h, EditOp("scale", scale=0.0, positions=(99,)), 10) is h
    assert torch.equal(h, torch.arange(24, dtype=torch.float32).reshape(1, 6, 4))  # input untouched


def test_layer_discovery():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    assert find_layers(gpt2) == list(gpt2.transformer.h)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    assert find_layers(llama) == list(llama.model.layers)
    with pytest.raises(dj.UnsupportedModelError, match="cannot find the decoder layers of Linear"):
        find_layers(torch.nn.Linear(2, 2))


def test_import_djinn_nb_is_light():
    import subprocess, sys
    code = "import sys, djinn_nb; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_pinned_arena_hands_out_and_coalesces_blocks():
    from kernel_server.checkpoints.snapshot import PinnedArena
    arena = PinnedArena(4096, buffer=torch.zeros(4096, dtype=torch.uint8))  # plain memory on CPU
    a, free_a = arena.take(1000)          # rounded up to 1024
    b, free_b = arena.take(1024)
    c, free_c = arena.take(2048)
    assert a.numel() == 1000 and b.numel() == 1024 and c.numel() == 2048
    assert arena.take(1) is None          # full: the caller falls back to torch's allocator
    a.fill_(1)
    assert int(b.sum()) == 0 and int(c.sum()) == 0       # blocks do not overlap
    free_b()
    free_a()
    big, free_big = arena.take(2048)      # a and b merged back into one block
    assert big.data_ptr() == a.data_ptr()
    free_big()
    free_c()
    whole, _ = arena.take(4096)
    assert whole.numel() == 4096
