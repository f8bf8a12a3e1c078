"""``model.site(name)``: a site bound to its model (module, input or output, shape) that captures,
edits and records like :mod:`steerlab.hooks`, checked against the HF model's own hidden states."""

import ast
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.errors import EmptyInputError, SiteError
from steerlab.hooks import capture
from steerlab.models.adapters import SITE_KINDS, Site
from steerlab.models.site import BoundSite
from tiny import tiny_model


def _hidden(m, text):
    ids = m.tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = m.hf(input_ids=ids, output_hidden_states=True, use_cache=False)
    return ids, out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_capture_equals_output_hidden_states_and_plain_capture(arch):
    m = tiny_model(arch)
    text = "hello world"
    _, out = _hidden(m, text)
    for layer in range(m.n_layers - 1):  # the last entry of hidden_states is after the final norm
        s = m.site(f"blocks.{layer}.resid_post")
        assert isinstance(s, BoundSite) and s.module is m.layer(layer) and s.where == "out"
        got = s.capture([text], "all")
        torch.testing.assert_close(got[0], out.hidden_states[layer + 1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.capture(text), capture(m, text, s.name)[s.name])
    pre = m.site("blocks.1.resid_pre")
    assert pre.where == "in" and pre.module is m.layer(1)
    torch.testing.assert_close(pre.capture(text, "last")[0], out.hidden_states[1][0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.site("final").capture(text, "last")[0], out.hidden_states[-1][0, -1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_shape_is_the_captured_activations_shape_for_every_kind(arch):
    m = tiny_model(arch)
    names = ["embed", "final"] + [f"blocks.1.{k}" for k in SITE_KINDS if not (k == "mlp.gate" and arch != "llama")]
    caps = capture(m, ["ab"], names, "last")
    for n in names:
        assert m.site(n).shape == tuple(caps[n].shape[1:]), n
        assert m.site_shape(n) == m.site(n).shape  # the older spelling
    assert m.site("blocks.1.attn.heads").shape == (m.n_heads, m.d_head)


def test_edit_and_record_delegate_to_the_hooks():
    m = tiny_model("llama")
    enc = m.encode(["hello world", "abc"])
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    s = m.site("blocks.1.resid_post")
    with s.edit(sl.add(v)):
        bound = m.forward(enc["input_ids"], enc["attention_mask"]).logits
    with sl.edit(m, {"blocks.1.resid_post": sl.add(v)}):
        plain = m.forward(enc["input_ids"], enc["attention_mask"]).logits
    base = m.forward(enc["input_ids"], enc["attention_mask"]).logits
    torch.testing.assert_close(bound, plain)
    assert (bound - base).abs().max() > 1e-3
    with s.edit(sl.add(v), sl.scale(0.0)):  # several edits run in order: the add is then zeroed
        zeroed = s.capture(["hello world"], "last")
    assert zeroed.abs().max() == 0
    with s.record("all") as rec:
        m.forward(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(rec[s.name], capture(m, enc, s.name, "all")[s.name])
    with pytest.raises(EmptyInputError, match="got no edit"):
        s.edit()


def test_bound_sites_stay_compatible_with_names_and_parsed_sites():
    m, other = tiny_model("llama"), tiny_model("llama", seed=1)
    s = m.site("blocks.-1.resid_post")
    assert s.name == "blocks.2.resid_post" and s.layer == 2 and s.kind == "resid_post"
    parsed = Site.parse("blocks.2.resid_post", m.n_layers)
    assert s == parsed and parsed == s and hash(s) == hash(parsed) and m.site(parsed) == s
    assert m.site(s) is s and other.site(s).model is other and other.site(s) == s
    assert sorted([m.site("final"), m.site("blocks.0.mlp.out"), m.site("embed")]) == \
        [m.site("embed"), m.site("blocks.0.mlp.out"), m.site("final")]
    assert m.site("blocks.0.mlp.out") < parsed and parsed > m.site("blocks.0.mlp.out")
    assert s.hook_point(m.hf, m.arch) == (m.layer(2), "out")
    assert "BoundSite('blocks.2.resid_post', out of LlamaDecoderLayer" in repr(s)
    with pytest.raises(SiteError, match="layer 7 out of range"):
        m.site("blocks.7.resid_post")
    g = tiny_model("gpt2")
    with pytest.raises(SiteError, match="no separate gate projection"):
        g.site("blocks.0.mlp.gate")


def test_hooks_reach_modules_only_through_bound_sites():
    """hooks.py reads no ``model.hf`` or ``model.arch`` (the bound site resolved them)."""
    src = Path(sl.hooks.__file__).read_text(encoding="utf-8")
    attrs = {n.attr for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Attribute)}
    assert not attrs & {"hf", "arch", "hook_point"}
