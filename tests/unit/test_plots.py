"""Unit tests of dj.plots without a server: the attention view, token labels, probabilities."""
from __future__ import annotations

import numpy as np
import pytest

import djinn_nb as dj

TOKENS = ["The", " capital", " of", " France", " is", " "]


def causal_pattern(heads: int = 3, n: int = len(TOKENS), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.tril(rng.random((heads, n, n)) + 0.01)
    return p / p.sum(-1, keepdims=True)


def test_attention_pattern_draws_one_panel_per_head_with_token_labels():
    pat = causal_pattern()
    fig = dj.plots.attention_pattern(pat, TOKENS, layer=6)
    assert [t.name for t in fig.data] == ["head 0", "head 1", "head 2"]
    # whitespace tokens are visible labels, on both axes; repeated tokens keep their own cell
    assert list(fig.layout.xaxis.ticktext) == ["The", "\u2423capital", "\u2423of", "\u2423France",
                                               "\u2423is", "\u2423"]
    assert list(fig.layout.yaxis.ticktext) == list(fig.layout.xaxis.ticktext)
    assert list(fig.layout.xaxis.tickvals) == list(range(len(TOKENS)))
    assert "block 6" in fig.layout.title.text
    for h, trace in enumerate(fig.data):
        z = np.array(trace.z, dtype=float)
        assert (trace.zmin, trace.zmax) == (0.0, 1.0)          # one scale for all heads
        # the masked (later-key) cells are blank, the rest is the pattern itself
        assert np.isnan(z[np.triu_indices(len(TOKENS), 1)]).all()
        low = np.tril_indices(len(TOKENS))
        np.testing.assert_allclose(z[low], pat[h][low])
    assert sum(bool(t.showscale) for t in fig.data) == 1


def test_attention_pattern_picks_heads_and_checks_its_input():
    pat = causal_pattern(heads=9)
    fig = dj.plots.attention_pattern(pat, TOKENS, heads=[8, 2])
    assert [t.name for t in fig.data] == ["head 8", "head 2"]
    with pytest.raises(ValueError, match="out of range"):
        dj.plots.attention_pattern(pat, TOKENS, heads=[9])
    with pytest.raises(ValueError, match=r"\[heads, query, key\]"):
        dj.plots.attention_pattern(np.zeros((2, 3, 4, 5)))
    # without tokens the axes show positions; a single [query, key] matrix is one head
    one = dj.plots.attention_pattern(pat[0])
    assert len(one.data) == 1 and list(one.layout.xaxis.ticktext) == [str(i) for i in range(6)]


def test_attention_pattern_queries_can_be_the_last_positions():
    # a pattern for the last 2 queries over 6 keys: query rows are labelled with their tokens
    pat = causal_pattern(heads=1)[:, -2:, :]
    fig = dj.plots.attention_pattern(pat, TOKENS)
    assert list(fig.layout.yaxis.ticktext) == ["\u2423is", "\u2423"]
    blank = np.isnan(np.array(fig.data[0].z, dtype=float))
    assert blank.sum() == 1 and blank[0, 5]          # query " is" (position 4) cannot see key 5


def test_token_label_and_probability_format():
    assert dj.plots.token_label(" \n\t") == "\u2423\u21b5\u21e5"
    assert dj.plots.token_label("") == "\u2205"
    assert [dj.plots.format_probability(p) for p in (0.41234, 0.0371, 3.2e-5, 0.0)] == \
        ["0.412", "0.037", "3.2e-05", "0.000"]
