"""record(): states read during generate equal a fresh forward over prompt + generated tokens."""

import pytest
import torch

import steerlab as sl
from tiny import PROMPTS


def _no_hooks(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.hf.modules())


@torch.no_grad()
def _generate(m, texts, n=6):
    enc = m.encode(texts)
    out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=m.pad_id)
    return enc, out


@pytest.mark.parametrize("positions", ["all", "last"])
def test_record_during_generate_equals_fresh_forward(any_model, positions):
    m = any_model
    sites = ["blocks.0.resid_post", f"blocks.{m.n_layers - 1}.attn.heads", "final"]
    n = 6
    with sl.record(m, sites, positions) as rec:
        enc, out = _generate(m, PROMPTS, n)
    assert _no_hooks(m)
    T = enc["input_ids"].shape[1]
    assert rec.calls == n and rec.passes == 1  # prefill + n-1 decode calls (the last token is never fed)
    # independent computation: one plain forward over prompt + generated tokens (all but the last)
    full = out[:, :-1]
    mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), n - 1, dtype=torch.long)], 1)
    ref = {}
    handles = [m.layer(0).register_forward_hook(lambda mod, a, o: ref.__setitem__("b0", (o[0] if isinstance(o, tuple) else o).clone()))]
    with torch.no_grad():
        hs = m.hf(input_ids=full, attention_mask=mask, position_ids=sl.models.model.position_ids(mask),
                  output_hidden_states=True)
    for h in handles:
        h.remove()
    if positions == "all":
        assert rec["final"].shape == (len(PROMPTS), T + n - 1, m.d_model)
        real = mask.bool()
        assert torch.equal(rec.mask.bool(), real)
        assert torch.equal(rec.input_ids, full)
        torch.testing.assert_close(rec["final"][real], hs.hidden_states[-1][real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rec["blocks.0.resid_post"][real], ref["b0"][real], atol=1e-4, rtol=1e-4)
    else:
        assert rec["final"].shape == (len(PROMPTS), n, m.d_model)
        torch.testing.assert_close(rec["final"], hs.hidden_states[-1][:, T - 1:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rec["blocks.0.resid_post"], ref["b0"][:, T - 1:], atol=1e-4, rtol=1e-4)
        assert torch.equal(rec.input_ids, full[:, T - 1:])
    heads = rec[f"blocks.{m.n_layers - 1}.attn.heads"]
    assert heads.shape[-2:] == (m.n_heads, m.d_head)


def test_record_matches_capture_on_a_plain_forward(llama):
    with sl.record(llama, ["blocks.1.resid_post"], "all") as rec, torch.no_grad():
        enc = llama.encode(PROMPTS)
        llama.forward(enc["input_ids"], enc["attention_mask"])
    cap = sl.capture(llama, PROMPTS, ["blocks.1.resid_post"], "all")
    real = cap.mask.bool()
    torch.testing.assert_close(rec["blocks.1.resid_post"][real], cap["blocks.1.resid_post"][real])
    assert torch.equal(rec.mask, cap.mask)


def test_record_keeps_the_latest_pass_and_bad_input(llama):
    with sl.record(llama, "final", "last") as rec:
        _generate(llama, PROMPTS[:1], 3)
        _generate(llama, PROMPTS, 4)
    assert rec.passes == 2 and rec["final"].shape[:2] == (len(PROMPTS), 4)
    with pytest.raises(sl.ShapeError, match="'all' or 'last'"):
        with sl.record(llama, "final", "mean"):
            pass
    with pytest.raises(sl.SiteError):
        with sl.record(llama, "blocks.99.resid_post"):
            pass
    with pytest.raises(sl.EmptyInputError):
        with sl.record(llama, []):
            pass
    with pytest.raises(RuntimeError), sl.record(llama, "final"):
        raise RuntimeError("boom")
    assert _no_hooks(llama)


def test_record_inside_edit_sees_the_edit(llama):
    v = torch.randn(llama.d_model)
    with sl.edit(llama, {"blocks.0.resid_post": sl.add(v, 2.0)}), sl.record(llama, "blocks.0.resid_post") as rec:
        enc = llama.encode(PROMPTS)
        with torch.no_grad():
            llama.forward(enc["input_ids"], enc["attention_mask"])
    cap = sl.capture(llama, PROMPTS, "blocks.0.resid_post", "all")
    real = cap.mask.bool()
    torch.testing.assert_close(rec["blocks.0.resid_post"][real], cap["blocks.0.resid_post"][real] + 2.0 * v)
