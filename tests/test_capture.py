"""capture() against independent computations: output_hidden_states and plain torch hooks."""

import pytest
import torch

import steerlab as sl
from steerlab.models.adapters import get_module
from tiny import PROMPTS


def _reference(model, texts):
    """Plain transformers: padded forward with output_hidden_states, plus hand-written hooks on
    the o_proj / down_proj inputs and the lm_head input."""
    enc = model.encode(texts)
    store = {}
    hs = []
    blocks = get_module(model.hf, model.arch.layers)
    for i, b in enumerate(blocks):
        hs.append(get_module(b, model.arch.attn_o).register_forward_pre_hook(
            lambda m, a, i=i: store.__setitem__(("heads", i), a[0].clone())))
        hs.append(get_module(b, model.arch.mlp_down).register_forward_pre_hook(
            lambda m, a, i=i: store.__setitem__(("act", i), a[0].clone())))
        hs.append(b.register_forward_hook(
            lambda m, a, o, i=i: store.__setitem__(("post", i), (o[0] if isinstance(o, tuple) else o).clone())))
    hs.append(model.unembed_module.register_forward_pre_hook(lambda m, a: store.__setitem__("final", a[0].clone())))
    with torch.no_grad():
        out = model.hf(**enc, output_hidden_states=True)
    for h in hs:
        h.remove()
    return enc, out.hidden_states, store


def test_resid_post_matches_hidden_states_all_archs(any_model):
    m = any_model
    enc, hidden, store = _reference(m, PROMPTS)
    L = m.n_layers
    sites = [f"blocks.{i}.resid_post" for i in range(L)] + ["final", "embed"]
    got = sl.capture(m, PROMPTS, sites, "all", batch_size=3)
    mask = enc["attention_mask"].bool()
    assert torch.equal(got.mask.bool(), mask)
    for i in range(L - 1):  # transformers' hidden_states[l+1] is block l's output, except the last
        ref = hidden[i + 1]
        assert (got[f"blocks.{i}.resid_post"] - ref)[mask].abs().max() <= 1e-5
    # the last hidden_states entry is taken after the final norm: it is `final`, not resid_post
    assert (got["final"] - hidden[L])[mask].abs().max() <= 1e-5
    assert (got[f"blocks.{L - 1}.resid_post"] - store[("post", L - 1)])[mask].abs().max() <= 1e-5
    # `final` is the input of lm_head
    assert (got["final"] - store["final"])[mask].abs().max() <= 1e-5


def test_heads_and_neurons_match_hooks(any_model):
    m = any_model
    enc, _, store = _reference(m, PROMPTS)
    got = sl.capture(m, PROMPTS, ["blocks.1.attn.heads", "blocks.-1.mlp.act", "blocks.0.mlp.act"], "last")
    ref_heads = store[("heads", 1)][:, -1].view(len(PROMPTS), m.n_heads, m.d_head)
    assert got["blocks.1.attn.heads"].shape == (len(PROMPTS), m.n_heads, m.d_head)
    assert (got["blocks.1.attn.heads"] - ref_heads).abs().max() <= 1e-5
    assert (got["blocks.-1.mlp.act"] - store[("act", m.n_layers - 1)][:, -1]).abs().max() <= 1e-5
    assert got["blocks.-1.mlp.act"] is got[f"blocks.{m.n_layers - 1}.mlp.act"]


def test_attn_and_mlp_out_sum_to_residual(any_model):
    """resid_post = resid_pre + attn.out + mlp.out (sequential blocks; GPT-NeoX uses parallel
    residual, where the same sum holds too)."""
    m = any_model
    sites = ["blocks.1.resid_pre", "blocks.1.attn.out", "blocks.1.mlp.out", "blocks.1.resid_post"]
    got = sl.capture(m, PROMPTS, sites, "all")
    mask = got.mask.bool()
    total = got["blocks.1.resid_pre"] + got["blocks.1.attn.out"] + got["blocks.1.mlp.out"]
    assert (total - got["blocks.1.resid_post"])[mask].abs().max() <= 1e-4


def test_positions(llama):
    m = llama
    full = sl.capture(m, PROMPTS, "blocks.1.resid_post", "all")
    a, mask = full["blocks.1.resid_post"], full.mask.bool()
    lengths = mask.sum(1)
    T = mask.shape[1]
    last = sl.capture(m, PROMPTS, "blocks.1.resid_post", "last")["blocks.1.resid_post"]
    assert torch.allclose(last, a[:, -1], atol=1e-6)
    mean = sl.capture(m, PROMPTS, "blocks.1.resid_post", "mean")["blocks.1.resid_post"]
    rest = sl.capture(m, PROMPTS + ["a"], "blocks.1.resid_post", "mean_skip_first")["blocks.1.resid_post"]
    mx = sl.capture(m, PROMPTS, "blocks.1.resid_post", "max")["blocks.1.resid_post"]
    for r in range(len(PROMPTS)):
        real = a[r, T - lengths[r]:]
        assert torch.allclose(mean[r], real.mean(0), atol=1e-5)
        assert lengths[r] > 1 and torch.allclose(rest[r], real[1:].mean(0), atol=1e-5)
        assert torch.allclose(mx[r], real.max(0).values, atol=1e-6)
    one = sl.capture(m, ["a"], "blocks.1.resid_post", "last")["blocks.1.resid_post"]
    assert torch.allclose(rest[-1], one[0], atol=1e-5)  # a one-token text keeps its token
    idx = sl.capture(m, PROMPTS, "blocks.1.resid_post", sl.Indices([0, 1, -1]))["blocks.1.resid_post"]
    for r in range(len(PROMPTS)):
        if lengths[r] >= 2:
            start = T - lengths[r]
            assert torch.allclose(idx[r], a[r, [start, start + 1, T - 1]], atol=1e-6)


def test_padding_invariance_and_order(llama):
    """A prompt's activations do not depend on its batch mates (left padding, masks, position ids)."""
    m = llama
    batched = sl.capture(m, PROMPTS, "blocks.2.resid_post", "last", batch_size=4)["blocks.2.resid_post"]
    for i, p in enumerate(PROMPTS):
        alone = sl.capture(m, [p], "blocks.2.resid_post", "last")["blocks.2.resid_post"][0]
        assert torch.allclose(batched[i], alone, atol=1e-5)


def test_early_stop_runs_only_needed_blocks(llama):
    m = llama
    calls = []
    hs = [m.layer(i).register_forward_hook(lambda *a, i=i: calls.append(i)) for i in range(m.n_layers)]
    head = m.unembed_module.register_forward_hook(lambda *a: calls.append("head"))
    try:
        sl.capture(m, PROMPTS, "blocks.0.resid_post", "last", batch_size=8)
    finally:
        for h in [*hs, head]:
            h.remove()
    assert calls == [0]


def test_pre_tokenized_batch(llama):
    enc = llama.encode(PROMPTS)
    a = sl.capture(llama, enc, "blocks.1.resid_post")["blocks.1.resid_post"]
    b = sl.capture(llama, PROMPTS, "blocks.1.resid_post")["blocks.1.resid_post"]
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inputs=[], sites="blocks.0.resid_post"), "no texts"),
        (dict(inputs=["x"], sites="blocks.3.resid_post"), "valid: -3..2"),
        (dict(inputs=["x"], sites="blocks.-4.resid_post"), "out of range"),
        (dict(inputs=["x"], sites="blocks.0.resid_mid"), "unknown site"),
        (dict(inputs=["x"], sites="encoder"), "unknown site"),
        (dict(inputs=["x"], sites=[]), "no sites"),
        (dict(inputs=["x"], sites="final", positions="middle"), "unknown position"),
        (dict(inputs=["x"], sites="final", positions=[5]), "out of range"),
        (dict(inputs=["x"], sites="final", batch_size=0), "batch_size"),
    ],
)
def test_capture_errors(llama, kwargs, message):
    with pytest.raises(sl.SteerlabError, match=message):
        sl.capture(llama, **kwargs)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in llama.hf.modules())
