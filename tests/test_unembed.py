"""``model.unembed``: the logit lens, the head, the soft-cap and the direct logit effect, against a
hand computation from the HF model's own modules and logits (output_hidden_states)."""

import numpy as np
import pytest
import torch

from steerlab.errors import ShapeError
from steerlab.explain.lens import top_tokens, unembed
from steerlab.explain.shifts import logit_shift
from tiny import tiny_model

ARCHS = ["llama", "gemma2", "gpt2", "qwen2"]


def _hf_parts(m):
    """The final norm, U and soft-cap read straight from the transformers model (no steerlab)."""
    base = m.hf.transformer if hasattr(m.hf, "transformer") else m.hf.model
    norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    return norm, m.hf.get_output_embeddings().weight, getattr(m.hf.config, "final_logit_softcapping", None)


def _forward(m, text="hello world"):
    ids = m.tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = m.hf(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_lens_reproduce_the_models_own_logits(arch):
    m = tiny_model(arch)
    norm, W, cap = _hf_parts(m)
    out = _forward(m)
    pre = []  # the last block's output before the final norm, caught with a plain torch hook
    hook = m.layer(m.n_layers - 1).register_forward_hook(lambda mod, i, o: pre.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        m.hf(input_ids=m.tok("hello world", return_tensors="pt")["input_ids"], use_cache=False)
    hook.remove()
    with torch.no_grad():  # the hand computation: norm, U, soft-cap
        hand = norm(pre[0]) @ W.T
        if cap:
            hand = torch.tanh(hand / cap) * cap
    torch.testing.assert_close(hand, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.unembed.lens(pre[0]), out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.unembed.logits(out.hidden_states[-1]), out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unembed(m, pre[0]), out.logits, atol=1e-4, rtol=1e-4)  # the explain wrapper
    assert m.unembed.weight is W and m.W_U is W and m.unembed_module is m.hf.get_output_embeddings()
    assert m.unembed.norm is norm and m.final_norm is norm and m.vocab_size == W.shape[0]


def test_gemma2_soft_cap_is_applied_to_logits_and_lens_but_not_to_the_direct_effect():
    m = tiny_model("gemma2")
    assert m.unembed.softcap == 30.0 and "softcap=30" in repr(m.unembed)
    out = _forward(m)
    h = out.hidden_states[-1]
    raw = m.unembed.logits(h, softcap=False)
    assert (raw - out.logits).abs().max() > 1e-3  # the cap matters for these weights
    torch.testing.assert_close(30.0 * torch.tanh(raw / 30.0), out.logits, atol=1e-4, rtol=1e-4)
    v = torch.randn(m.d_model) * 50
    torch.testing.assert_close(m.unembed.direct_effect(v), v @ m.hf.get_output_embeddings().weight.T)
    assert m.unembed.direct_effect(v).abs().max() > 30  # not capped
    assert tiny_model("llama").unembed.softcap is None


def test_direct_effect_is_linear_and_drives_top_tokens_and_logit_shift():
    m = tiny_model("llama")
    W = m.hf.get_output_embeddings().weight.detach()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m.d_model, generator=g), torch.randn(m.d_model, generator=g)
    torch.testing.assert_close(m.unembed.direct_effect(a + 2 * b), m.unembed.direct_effect(a) + 2 * m.unembed.direct_effect(b),
                               atol=1e-5, rtol=1e-5)
    scores = top_tokens(m, a, k=3)
    best = (a @ W.T).topk(3).values
    assert [s for _, s in scores.promoted] == pytest.approx(best.tolist(), abs=1e-5)
    D = np.random.default_rng(0).normal(size=(4, 2, m.d_model))
    hand = D.mean(0) @ W.double().numpy().T
    np.testing.assert_allclose(logit_shift(D, m.unembed), hand, atol=1e-10)
    np.testing.assert_allclose(logit_shift(D, W), hand, atol=1e-10)


def test_unembed_sees_an_untied_or_swapped_weight_and_refuses_wrong_sizes():
    m = tiny_model("llama")
    assert m.tied()
    m.untie_unembedding()
    assert not m.tied() and m.unembed.weight is m.hf.get_output_embeddings().weight
    with torch.no_grad():
        m.hf.get_output_embeddings().weight.mul_(2)
    v = torch.ones(m.d_model)
    torch.testing.assert_close(m.unembed.direct_effect(v), v @ m.hf.get_output_embeddings().weight.detach().T)
    with pytest.raises(ShapeError, match="vector of size 5 cannot be unembedded: tiny-llama has d_model=32"):
        m.unembed.lens(torch.ones(5))
    with pytest.raises(ShapeError, match="cannot be unembedded"):
        m.unembed.direct_effect(torch.ones(2, 7))
