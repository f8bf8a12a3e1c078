"""Logit lens against hand computations."""

import pytest
import torch

import steerlab as sl
from steerlab.explain import layer_lens, top_tokens, unembed


def test_top_tokens_matches_unembedding(llama):
    m = llama
    v = torch.randn(m.d_model)
    res = top_tokens(m, v, k=4)
    logits = m.W_U @ v
    ids = logits.topk(4).indices
    assert [s for _, s in res.promoted] == pytest.approx(logits[ids].tolist(), abs=1e-5)
    assert res.promoted[0][1] >= res.promoted[-1][1]
    low = logits.topk(4, largest=False)
    assert [s for _, s in res.suppressed] == pytest.approx(low.values.tolist(), abs=1e-5)


def test_layer_lens_matches_hidden_states(any_model):
    m = any_model
    prompt = "hello world"
    lens = layer_lens(m, prompt, k=3)
    enc = m.encode([prompt])
    with torch.no_grad():
        out = m.hf(**enc, output_hidden_states=True)
    # last row is the model's own prediction
    probs = out.logits[0, -1].softmax(-1)
    assert [p for _, p in lens.top[-1]] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-5)
    # an intermediate row: softmax(U norm(h_0))
    with torch.no_grad():
        p0 = m.unembed_module(m.final_norm(out.hidden_states[1][0, -1])).softmax(-1)
    cap = getattr(m.config, "final_logit_softcapping", None)
    if not cap:
        assert [p for _, p in lens.top[0]] == pytest.approx(p0.topk(3).values.tolist(), abs=1e-5)
    assert lens.layers == [str(i) for i in range(m.n_layers)]


def test_lens_errors(llama):
    with pytest.raises(sl.ShapeError, match="d_model=32"):
        unembed(llama, torch.ones(7))
    with pytest.raises(sl.SiteError, match="out of range"):
        layer_lens(llama, "hi", layers=[7])
