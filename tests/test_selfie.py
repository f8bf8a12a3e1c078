"""SelfIE: interpretation prompts, injection at the placeholders, relevancy, vectors, control.
Every check compares with an independent computation (plain torch hooks, output_hidden_states,
hand-rolled greedy decoding and softmax)."""

import pytest
import torch

from steerlab.errors import SteerlabError
from steerlab.explain.selfie import (
    InterpretationPrompt,
    SelfieError,
    control_states,
    decode_injected,
    generate_injected,
    head_output,
    interpret,
    interpret_states,
    interpret_vectors,
    interpretation_prompt,
    prefix_cache,
    probs_without,
    read_states,
    token_probs,
    typical_norm,
)
from steerlab.explain.selfie_control import SelfieControl
from tiny import flat, tiny_model

torch.set_num_threads(1)
PARTS = ["ab", 3, " cd ", 2, "!"]


def _hidden_states(m, ids):
    with torch.no_grad():
        return m.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _block_input_recorder(m, k, calls):
    """A plain forward hook on block k that sees the block's input after any pre-hook (the edit)."""
    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        calls.append(x.detach().clone())
    return m.layer(k).register_forward_hook(hook, with_kwargs=True)


def test_interpretation_prompt_positions_are_exact():
    m = tiny_model("llama")
    ip = interpretation_prompt(m, PARTS, chat=False)
    expected = m.tok("ab___ cd __!")["input_ids"]  # one token per character, <bos> first
    assert list(ip.ids) == expected
    assert list(ip.positions) == [i for i, t in enumerate(expected) if t == m.tok.convert_tokens_to_ids("_")]
    assert ip.text(m).count("[X]") == 5


def test_interpretation_prompt_through_a_chat_template():
    m = tiny_model("llama")
    m.tok.chat_template = "{% for x in messages %}<{{ x['content'] }}>{% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    ip = interpretation_prompt(m, [2, "ok"])
    assert ip.chat and list(ip.ids) == m.tok("<__ok>=>", add_special_tokens=False)["input_ids"]
    assert list(ip.positions) == [1, 2]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "gemma3_text", "qwen3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_injected_state_sits_at_the_placeholders_of_block_k_input_during_prefill_only(arch, mode):
    m = tiny_model(arch)
    ip = interpretation_prompt(m, PARTS, chat=False)
    states = torch.randn(3, m.d_model) * 2
    for k in sorted({0, 1, m.n_layers - 1}):
        calls: list[torch.Tensor] = []
        h = _block_input_recorder(m, k, calls)
        try:
            new = decode_injected(m, ip, states, k=k, mode=mode, strength=0.5, max_new_tokens=4)
        finally:
            h.remove()
        P, n, pre = len(ip), new.shape[1], ip.positions[0]
        # the shared prefix once (one row), the rest of the prompt (the prefill), then one token per call
        assert [tuple(c.shape[:2]) for c in calls] == [(1, pre), (3, P - pre)] + [(3, 1)] * (n - 1)
        seen = torch.cat([calls[0].expand(3, -1, -1), *calls[1:]], 1)
        full = torch.cat([torch.tensor([ip.ids]).expand(3, -1), new], 1)
        expected = _hidden_states(m, full)[k][:, :P + n - 1].clone()  # no injection anywhere
        pos = list(ip.positions)
        want = states[:, None, :] if mode == "replace" else expected[:, pos] + 0.5 * states[:, None, :]
        expected[:, pos] = want.expand(-1, len(pos), -1)
        torch.testing.assert_close(seen, expected, atol=1e-4, rtol=1e-4)


def test_no_injection_equals_plain_generation():
    m = tiny_model("qwen2")
    ip = interpretation_prompt(m, PARTS, chat=False)
    ids = torch.tensor([ip.ids])
    with torch.no_grad():
        plain = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=m.pad_id)[:, len(ip):]
    states = torch.randn(2, m.d_model)
    for mode, s in [("none", 1.0), ("add", 0.0)]:
        new = decode_injected(m, ip, states, mode=mode, strength=s, max_new_tokens=6)
        assert torch.equal(new, plain.expand(2, -1))
    cut = ip.positions[0]
    no_prefix = InterpretationPrompt(ip.ids[cut:], tuple(p - cut for p in ip.positions))  # placeholders first
    ids = torch.tensor([no_prefix.ids])
    with torch.no_grad():
        plain2 = m.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               do_sample=False, pad_token_id=m.pad_id)[:, len(no_prefix):]
    assert torch.equal(decode_injected(m, no_prefix, states, mode="none", max_new_tokens=6), plain2.expand(2, -1))
    res = interpret_states(m, states, ip, mode="none", max_new_tokens=6)
    assert res[0][0] == m.tok.decode(plain[0], skip_special_tokens=True)
    assert res[0][2] == [0.0] * len(res[0][1])  # nothing injected: nothing is relevant


def test_batched_interpretation_equals_one_at_a_time():
    m = tiny_model("llama")
    pairs = [(L, t) for L in range(m.n_layers + 1) for t in (0, 3, -1)]
    batched = interpret(m, "hello world", pairs, PARTS, max_new_tokens=8, batch_size=16, numbering="hf")
    single = interpret(m, "hello world", pairs, PARTS, max_new_tokens=8, batch_size=1, numbering="hf")
    assert [r.text for r in batched.rows] == [r.text for r in single.rows]
    for a, b in zip(batched.rows, single.rows):
        assert a.tokens == b.tokens
        assert a.token_relevancy == pytest.approx(b.token_relevancy, abs=1e-5)
    assert len({r.text for r in batched.rows}) > 1  # different states give different texts


def test_states_are_the_hf_hidden_states():
    for arch in ("llama", "gemma"):
        m = tiny_model(arch)
        prompt = "The quick brown fox!"
        ids = m.tok([prompt], return_tensors="pt")["input_ids"]
        hs = _hidden_states(m, ids)
        n = m.n_layers
        st = read_states(m, prompt, [(0, 0), (1, -1), (n - 1, 4), (-1, 2)], numbering="hf")
        torch.testing.assert_close(st.vectors[0], hs[0][0, 0])  # gemma: the scaled embeddings
        torch.testing.assert_close(st.vectors[1], hs[1][0, -1])
        torch.testing.assert_close(st.vectors[2], hs[n - 1][0, 4])
        outs = []
        h = m.layer(n - 1).register_forward_hook(lambda mod, a, o, outs=outs: outs.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m.hf(input_ids=ids)
        h.remove()
        torch.testing.assert_close(st.vectors[3], outs[0][0, 2])  # layer n: the last block's raw output
        assert st.pairs[3] == (n, 2) and st.token_texts[1] == "!" and st.n_tokens == ids.shape[1]


def _hand_interpretation(m, ip, state, k, steps):
    """Greedy decoding and relevancy by hand: full forwards, a plain pre-hook writing the state."""
    pos = list(ip.positions)

    def pre(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, pos] = state.to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    ids = list(ip.ids)
    h = m.layer(k).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for _ in range(steps):
            with torch.no_grad():
                ids.append(int(m.hf(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        with torch.no_grad():
            p_with = m.hf(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
    finally:
        h.remove()
    with torch.no_grad():
        p_without = m.hf(input_ids=torch.tensor([ids])).logits[0].softmax(-1)
    new = ids[len(ip):]
    rows = torch.arange(len(ip) - 1, len(ids) - 1)
    return new, p_with[rows, new] - p_without[rows, new]  # signed: the treatment effect


def test_relevancy_and_text_equal_a_hand_computation():
    m = tiny_model("llama")
    ip = interpretation_prompt(m, PARTS, chat=False)
    res = interpret(m, "steer me", [(2, -1), (1, 0)], ip, max_new_tokens=6, numbering="hf")
    ids = m.tok(["steer me"], return_tensors="pt")["input_ids"]
    hs = _hidden_states(m, ids)
    for row, (L, t) in zip(res.rows, [(2, -1), (1, 0)]):
        new, rel = _hand_interpretation(m, ip, hs[L][0, t], 1, 6)
        n = new.index(m.tok.eos_token_id) if m.tok.eos_token_id in new else len(new)  # the text ends at <eos>
        new, rel = new[:n], rel[:n]
        assert n >= 2
        assert row.tokens == [m.tok.convert_tokens_to_string([m.tok.convert_ids_to_tokens(i)]) for i in new]
        assert row.token_relevancy == pytest.approx(rel.tolist(), abs=1e-5)
        assert row.relevancy == pytest.approx(float(rel.mean()), abs=1e-6)
        absolute = interpret(m, "steer me", [(L - 1, t)], ip, max_new_tokens=6, relevancy_form="absolute").rows[0]
        assert absolute.token_relevancy == pytest.approx(rel.abs().tolist(), abs=1e-5)
        cut = ip.positions[0]  # the same without a shared prefix (placeholders first)
        no_prefix = InterpretationPrompt(ip.ids[cut:], tuple(p - cut for p in ip.positions))
        new_t, state = torch.tensor([new]), hs[L][0, t][None]
        assert token_probs(m, no_prefix, new_t, state).shape == (1, n)
        p_with = token_probs(m, ip, new_t, state, prefix=None)
        torch.testing.assert_close(p_with, token_probs(m, ip, new_t, state, prefix=prefix_cache(m, ip)))
        gen_new, gen_p = generate_injected(m, ip, state, max_new_tokens=6)  # the decoding pass's own probabilities
        assert gen_new[0, :n].tolist() == new
        torch.testing.assert_close(gen_p[:, :n], p_with, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(probs_without(m, ip, new_t), token_probs(m, ip, new_t), atol=1e-5, rtol=1e-4)


def test_interpret_vectors_scaled_to_a_typical_norm():
    m = tiny_model("gemma2")
    v = torch.randn(3, m.d_model)
    norm = typical_norm(m, 1)
    res = interpret_vectors(m, v, PARTS, norm="typical", max_new_tokens=4, labels=["a", "b", "c"])
    direct = interpret_states(m, v / v.norm(dim=-1, keepdim=True) * norm, PARTS, max_new_tokens=4)
    assert [r.text for r in res.rows] == [d[0].strip() for d in direct]
    assert [r.token_text for r in res.rows] == ["a", "b", "c"] and res.rows[0].layer is None
    one = interpret_vectors(m, v[0], PARTS, norm=5.0, max_new_tokens=4)
    assert len(one.rows) == 1


@pytest.mark.parametrize("call, words", [
    (lambda m: interpretation_prompt(m, ["no placeholder here"], chat=False), "no placeholder"),
    (lambda m: interpret(m, "hi", [(1, 0)], "a plain string"), "not a single string"),
    (lambda m: interpret(m, "hi", [(1, 7)], PARTS), "token index 7 is beyond the prompt"),
    (lambda m: interpret(m, "hi", [(9, 0)], PARTS), "layer 9 is out of range"),
    (lambda m: interpret(m, "hi", [(1, 0)], PARTS, k=5), "injection block k=5"),
    (lambda m: interpret(m, "hi", [(1, 0)], PARTS, mode="swap"), "unknown injection mode"),
    (lambda m: interpret(m, "hi", [], PARTS), "no (layer, token) pairs"),
    (lambda m: interpret(m, "hi", [(3, 0)], PARTS, numbering="blocks"), "blocks are 0..2"),
    (lambda m: interpret(m, "hi", [(1, 0)], PARTS, numbering="gpt"), "unknown layer numbering"),
    (lambda m: interpret(m, "hi", [("blocks.1.mlp.act", 0)], PARTS), "not a d_model vector"),
    (lambda m: interpret(m, "hi", [("blocks.1.attn.head.4", 0)], PARTS), "head 4 is out of range"),
    (lambda m: interpret(m, "hi", [("blocks.1.nothing", 0)], PARTS), "unknown site"),
    (lambda m: interpret(m, "hi", [(1, 0)], PARTS, relevancy_form="square"), "unknown relevancy form"),
    (lambda m: interpret(m, "hi", [(1, 0)], PARTS, baseline="zero"), "unknown baseline"),
    (lambda m: interpret_vectors(m, torch.zeros(2, 7), PARTS), "d_model=32"),
    (lambda m: interpret_vectors(m, torch.zeros(2, 32), PARTS, norm="big"), "norm must be"),
    (lambda m: interpretation_prompt(m, [2, "x"], chat=False, placeholder="ab"), "exactly one token"),
    (lambda m: interpretation_prompt(m, [0, "x"], chat=False), "placeholder count must be >= 1"),
    (lambda m: interpretation_prompt(m, [2, "x"], chat=True), "no chat template"),
])
def test_bad_input_is_a_clear_error(call, words):
    m = tiny_model("llama")
    with pytest.raises(SteerlabError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        call(m)
    assert isinstance(e.value, SelfieError)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_any_d_model_site_is_read_as_hooks_see_it(arch):
    """attn.out, mlp.out, resid_pre and a head's output through o_proj, against plain module hooks;
    the heads' outputs add up to the projection's output (minus its bias)."""
    m = tiny_model(arch)
    prompt = "The quick brown fox!"
    ids = m.tok([prompt], return_tensors="pt")["input_ids"]
    blk = m.layer(1)
    attn = blk.self_attn if hasattr(blk, "self_attn") else blk.attn
    o = attn.o_proj if hasattr(attn, "o_proj") else attn.c_proj
    got: dict = {}
    hooks = [o.register_forward_hook(lambda mod, a, out: got.update(z=a[0].detach(), o=out.detach())),
             blk.register_forward_pre_hook(lambda mod, a, kw: got.update(pre=(a[0] if a else kw["hidden_states"])),
                                           with_kwargs=True)]
    with torch.no_grad():
        m.hf(input_ids=ids)
    for h in hooks:
        h.remove()
    st = read_states(m, prompt, [("blocks.1.resid_pre", 2), ("blocks.1.attn.head.0", 2), ("blocks.1.attn.head.3", 2),
                                 (2, 2)], numbering="blocks" if m.n_layers > 2 else "hf")
    torch.testing.assert_close(st.vectors[0], got["pre"][0, 2])
    z = got["z"][0, 2]
    W = o.weight.T if type(o).__name__ == "Conv1D" else o.weight  # Linear [d, H*dh]; GPT-2's Conv1D [H*dh, d]
    dh = m.d_head
    torch.testing.assert_close(st.vectors[1], W[:, :dh] @ z[:dh], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.vectors[2], W[:, 3 * dh:] @ z[3 * dh:], atol=1e-5, rtol=1e-5)
    heads = sum(head_output(m, 1, h, z.view(1, m.n_heads, dh)) for h in range(m.n_heads))[0]
    bias = o.bias if o.bias is not None else 0.0
    torch.testing.assert_close(heads + bias, got["o"][0, 2], atol=1e-5, rtol=1e-5)
    assert st.pairs[1] == ("blocks.1.attn.head.0", 2)
    mlp = read_states(m, prompt, [("blocks.0.mlp.out", 1), ("blocks.0.attn.out", 1)])
    pre0 = _hidden_states(m, ids)
    assert mlp.vectors.shape == (2, m.d_model) and not torch.allclose(mlp.vectors[0], pre0[1][0, 1])
    res = interpret(m, prompt, [("blocks.1.attn.head.0", -1), ("blocks.0.mlp.out", -1)], PARTS, max_new_tokens=3)
    assert [r.layer for r in res.rows] == ["blocks.1.attn.head.0", "blocks.0.mlp.out"]


def test_block_numbering_is_the_site_vocabulary():
    m = tiny_model("llama")
    hf = read_states(m, "hello world", [(1, -1), (3, 0)], numbering="hf")
    blocks = read_states(m, "hello world", [(0, -1), (2, 0)], numbering="blocks")
    torch.testing.assert_close(hf.vectors, blocks.vectors)
    assert blocks.pairs == [(0, 11), (2, 0)] and hf.pairs == [(1, 11), (3, 0)]  # <bos> + 11 characters


def test_random_state_baseline():
    m = tiny_model("llama")
    x = torch.randn(4, m.d_model) * 3
    for kind in ("norm", "permute"):
        c = control_states(x, kind, seed=1)
        torch.testing.assert_close(c.norm(dim=-1), x.norm(dim=-1))
        assert not torch.allclose(c, x)
    torch.testing.assert_close(control_states(x, "permute").sort(dim=-1).values, x.sort(dim=-1).values)
    res = interpret(m, "hello world", [(1, -1), (2, 0)], PARTS, max_new_tokens=5, baseline="norm")
    st = read_states(m, "hello world", [(1, -1), (2, 0)])
    ref = interpret_states(m, control_states(st.vectors, "norm"), PARTS, max_new_tokens=5)
    assert [r.text for r in res.baseline_rows] == [t.strip() for t, _, _ in ref]
    assert [r.baseline for r in res.rows] == pytest.approx([sum(x) / len(x) for _, _, x in ref], abs=1e-6)
    summ = res.baseline_summary()
    assert summ["n"] == 2 and summ["kind"] == "norm" and 0.0 <= summ["share_above_q95"] <= 1.0
    assert "baseline_relevancy" in res.table()[0]
    assert interpret(m, "hello world", [(1, -1)], PARTS, max_new_tokens=3).baseline_summary() is None


# --- supervised control ------------------------------------------------------------------------------
def _state(m, text, L, t):
    return _hidden_states(m, m.tok([text], return_tensors="pt")["input_ids"])[L][0, t]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_control_moves_the_state_toward_the_target_and_restores_the_weights(arch, tmp_path):
    from steerlab.interventions import fit, load

    m = tiny_model(arch)
    b, src = 0, "hello world"  # the state after block 0 = hidden_states[1]; block 0's MLP is edited
    target = _state(m, "The quick brown fox!", b + 1, -1)
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    iv = fit("selfie-control", m, src, layer=b, token=-1, target=target, steps=20)
    assert all(torch.equal(v, before[k]) for k, v in m.hf.state_dict().items())  # fitting edits nothing
    d0 = float((_state(m, src, b + 1, -1) - target).norm())
    with iv.apply(m):
        d1 = float((_state(m, src, b + 1, -1) - target).norm())
        changed = sorted(k for k, v in m.hf.state_dict().items() if not torch.equal(v, before[k]))
    assert d1 < d0 - 1e-3, (d0, d1)
    assert d1 == pytest.approx(iv.meta["distance_after"], rel=1e-4) and d0 == pytest.approx(iv.meta["distance_before"])
    mlp = [n for n, _ in m.layer(0).named_parameters() if n.startswith("mlp.")]
    assert len(changed) == len(mlp) >= 2 and sorted(iv.deltas) == changed  # every MLP parameter, nothing else
    assert all(("layers.0.mlp" in c or ".h.0.mlp" in c) for c in changed) and iv.sites == ["blocks.0.mlp.out"]
    assert all(torch.equal(v, before[k]) for k, v in m.hf.state_dict().items())  # restored bit for bit
    with pytest.raises(RuntimeError), iv.apply(m):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in m.hf.state_dict().items())  # also after an error
    path = iv.save(tmp_path / "c.safetensors")
    back = load(path, m)
    assert sorted(back.tensors()) == [f"delta.{n}" for n in changed]
    with back.apply(m):
        assert float((_state(m, src, b + 1, -1) - target).norm()) == pytest.approx(d1, rel=1e-5)


def test_control_numbering_params_and_targets():
    m = tiny_model("llama")
    down = SelfieControl.fit(m, "hello world", layer=2, numbering="hf", params="down", target=torch.zeros(32), steps=3)
    assert down.meta["block"] == 1 and list(down.deltas) == ["model.layers.1.mlp.down_proj.weight"]
    assert down.delta.shape == m.layer(1).mlp.down_proj.weight.shape
    # a target read at a later layer (as in the notebooks): the state after block 2 of the target text
    later = SelfieControl.fit(m, "hello world", layer=0, target="steer me", target_layer=1, steps=2)
    assert later.meta["target_layer"] == 1 and later.meta["distance_before"] == pytest.approx(
        float((_state(m, "hello world", 1, -1) - _state(m, "steer me", 2, -1)).norm()), rel=1e-5)
    # an older file: one 'delta' on the down projection named in meta['module'], with an HF meta['layer']
    old = SelfieControl.from_tensors({"delta": down.delta}, {"layer": 2, "module": "model.layers.1.mlp.down_proj.weight"})
    assert old.meta["block"] == 1 and torch.equal(old.delta, down.delta)


def test_control_preservation_term_keeps_reference_states_closer():
    m = tiny_model("llama")
    b, refs = 0, ["a", "steer me", "The quick brown fox!"]
    target = torch.randn(m.d_model) * 3
    kw = dict(layer=b, token=-1, target=target, steps=15, lr=1e-2)
    free = SelfieControl.fit(m, "hello world", **kw)
    kept = SelfieControl.fit(m, "hello world", **kw, preserve=refs, preserve_weight=50.0)

    def ref_change(iv):
        base = [_state(m, r, b + 1, slice(None)) for r in refs]
        with iv.apply(m):
            return sum(float(((_state(m, r, b + 1, slice(None)) - x) ** 2).mean()) for r, x in zip(refs, base))

    assert ref_change(kept) < ref_change(free)
    assert kept.meta["n_preserve"] == 3 and kept.meta["distance_after"] < kept.meta["distance_before"]


@pytest.mark.parametrize("call, words", [
    (lambda m: SelfieControl.fit(m, "hi", layer=0, numbering="hf", target=torch.zeros(32)), "layer 0 is the embeddings"),
    (lambda m: SelfieControl.fit(m, "hi", layer=1, target=torch.zeros(5)), "d_model=32"),
    (lambda m: SelfieControl.fit(m, "hi", layer=1, token=9, target=torch.zeros(32)), "beyond the prompt"),
    (lambda m: SelfieControl.fit(m, "hi", layer=7, target=torch.zeros(32)), "layer 7 is out of range"),
    (lambda m: SelfieControl.fit(m, "hi", layer=1, params="all", target=torch.zeros(32)), "unknown params"),
    (lambda m: SelfieControl({"x.weight": torch.zeros(3, 3)}, {"block": 1}).check(m), "no parameter 'x.weight'"),
    (lambda m: SelfieControl({"model.layers.1.mlp.down_proj.weight": torch.zeros(3, 3)}, {"block": 1}).check(m),
     "fitted on another model"),
])
def test_control_bad_input(call, words):
    with pytest.raises(SelfieError, match=words):
        call(tiny_model("llama"))


def test_control_is_registered():
    from steerlab.interventions import list_interventions

    assert "selfie-control" in list_interventions()


# --- text forms, report, command line ----------------------------------------------------------------
def test_parse_parts():
    from steerlab.explain.selfie import parse_parts

    assert parse_parts("[X][X][X] Sum up") == [3, " Sum up"]
    assert parse_parts("a[X]b[X][X]") == ["a", 1, "b", 2]
    assert parse_parts("no marker") == ["no marker"]


def test_interpret_cli_prints_the_table_and_writes_the_grid(tmp_path):
    import html
    import re

    from typer.testing import CliRunner

    from steerlab.cli import app

    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    out = tmp_path / "grid.html"
    args = ["interpret", "hello world", "--model", str(d), "--layers", "0,2", "--tokens", "-1,0",
            "--template", "[X][X] means:", "--max-new-tokens", "4", "--html", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "interpretation" in r.output and "relevancy" in r.output
    rows = [line for line in r.output.splitlines() if re.match(r"^│\s+[02] │", line)]
    assert len(rows) == 4
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 3
    grid = page.split("<h2>")[1]
    assert grid.count("<tr>") == 3 and html.escape("0: '<bos>'") in grid and html.escape("11: 'd'") in grid
    assert "l = the state after block l" in flat(r.output)
    expected = interpret(m, "hello world", [(0, -1)], ["", 2, " means:"], max_new_tokens=4)  # not chat: no template
    assert html.escape(expected.rows[0].text) in grid
    bad = CliRunner().invoke(app, ["interpret", "hello", "--model", str(d), "--tokens", "40"])
    assert bad.exit_code == 2 and "beyond the prompt" in bad.output
    bad = CliRunner().invoke(app, ["interpret", "hello", "--model", str(d), "--template", "no marker"])
    assert bad.exit_code == 2 and "no placeholder" in bad.output


@pytest.mark.integration
def test_selfie_on_the_default_model(real_model):
    """SmolLM2-135M-Instruct reads 'Paris' back from its own state; without the injection it does not."""
    pairs = [(5, -1), (10, -1)]
    res = interpret(real_model, "The capital of France is Paris", pairs, max_new_tokens=12)
    assert all("Paris" in r.text for r in res.rows), res.table()
    assert all(r.relevancy > 0.05 for r in res.rows)
    control = interpret(real_model, "The capital of France is Paris", pairs[:1], mode="none", max_new_tokens=12)
    assert "Paris" not in control.rows[0].text and control.rows[0].relevancy == 0.0


def test_interpret_vector_cli(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app
    from steerlab.steer.vector import SteeringVector

    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    sv = SteeringVector.fit(m, (["nice day", "good"], ["bad day", "awful"]), sites=["blocks.0.resid_post",
                                                                                   "blocks.1.resid_post"])
    path = sv.save(tmp_path / "v.safetensors")
    args = ["interpret-vector", str(path), "--model", str(d), "--template", "[X][X]:", "--max-new-tokens", "4",
            "--sites", "blocks.1.resid_post", "--norm", "3.5"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    direct = interpret_vectors(m, sv.directions["blocks.1.resid_post"], [2, ":"], norm=3.5, max_new_tokens=4)
    assert "blocks.1.resid_post" in r.output and direct.rows[0].text in r.output
    bad = CliRunner().invoke(app, args[:-4] + ["--sites", "blocks.2.resid_post"])
    assert bad.exit_code == 2 and "not in" in bad.output
    r = CliRunner().invoke(app, args + ["--baseline", "permute", "--relevancy", "absolute"])
    assert r.exit_code == 0, r.output
    ref = interpret_vectors(m, sv.directions["blocks.1.resid_post"], [2, ":"], norm=3.5, max_new_tokens=4,
                            relevancy_form="absolute", baseline="permute")
    s = ref.baseline_summary()
    assert "absolute relevancy" in flat(r.output) and f"relevancy mean {s['mean']:.3f}" in flat(r.output)


# --- supervised control on the command line ------------------------------------------------------------
def _edited_weights(m, iv):
    """The edited MLP parameters with the file's deltas added by hand (not through apply)."""
    named = dict(m.hf.named_parameters())
    return {n: (named[n], named[n].detach().clone() + d) for n, d in iv.deltas.items()}


def test_fit_selfie_control_cli_saves_an_edit_that_generate_and_interpret_apply(tmp_path):
    import json
    import re

    from typer.testing import CliRunner

    import steerlab as sl
    from steerlab.cli import app
    from steerlab.interventions import load
    from tiny import model_dir

    d = model_dir(tmp_path)
    out, runner = tmp_path / "c.safetensors", CliRunner()
    r = runner.invoke(app, ["fit", "selfie-control", "--out", str(out), "--model", d, "--prompt", "hello world",
                            "--layer", "1", "--target", "The quick brown fox!", "--steps", "12", "--lr", "1e-2",
                            "--preserve", "steer me"])
    assert r.exit_code == 0, r.output
    assert "after block 1 (blocks.1.resid_post)" in flat(r.output)
    m = sl.load(d)
    iv = load(out, m)  # the saved file loads, checked against the model's fingerprint
    assert iv.method == "selfie-control" and iv.meta["block"] == 1 and iv.meta["n_preserve"] == 1
    # the distance, recomputed with plain output_hidden_states and the deltas added by hand
    target = _state(m, "The quick brown fox!", 2, -1)
    d0 = float((_state(m, "hello world", 2, -1) - target).norm())
    edits = _edited_weights(m, iv)
    originals = {n: w.detach().clone() for n, (w, _) in edits.items()}
    with torch.no_grad():
        for w, e in edits.values():
            w.copy_(e)
    d1 = float((_state(m, "hello world", 2, -1) - target).norm())
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\nline of text\n")
    by_hand = sl.generation.generate(m, ["hello world", "line of text"], max_new_tokens=4)
    st = read_states(m, "hello world", [(1, -1)]).vectors
    with torch.no_grad():
        for n, (w, _) in edits.items():
            w.copy_(originals[n])
    assert d1 < 0.9 * d0, (d0, d1)
    printed = [float(x) for x in re.search(r"token \d+: ([\d.e+-]+) -> ([\d.e+-]+)", flat(r.output)).groups()]
    assert printed == pytest.approx([d0, d1], rel=1e-3)
    # generate --intervention: the same continuations as the model with the delta added by hand
    run = tmp_path / "run"
    r = runner.invoke(app, ["generate", "--out", str(run), "--model", d, "--prompts", str(prompts),
                            "--max-new-tokens", "4", "--scorer", "none", "--intervention", str(out)])
    assert r.exit_code == 0, r.output
    rows = {x["prompt"]: x["continuation"] for x in map(json.loads, (run / "results.jsonl").read_text().splitlines())}
    assert [rows["hello world"], rows["line of text"]] == [c[0] for c in by_hand]
    # interpret --intervention: the unedited and the edited state's interpretations side by side
    r = runner.invoke(app, ["interpret", "hello world", "--model", d, "--layers", "1", "--template", "[X][X] means:",
                            "--max-new-tokens", "4", "--intervention", str(out)])
    assert r.exit_code == 0, r.output
    plain = interpret(m, "hello world", [(1, -1)], ["", 2, " means:"], max_new_tokens=4).rows[0]
    (edited_text, _, _), = interpret_states(m, st, ["", 2, " means:"], max_new_tokens=4)
    assert "with c.safetensors" in flat(r.output)
    assert plain.text in flat(r.output) and edited_text.strip() in flat(r.output)
    # a target vector from a file, and the paper's numbering: --layer 2 --hf-layer is block 1 again
    vec = tmp_path / "t.npy"
    import numpy as np

    np.save(vec, target.numpy())
    r = runner.invoke(app, ["fit", "selfie-control", "--out", str(tmp_path / "v.safetensors"), "--model", d, "--prompt",
                            "hello world", "--layer", "2", "--hf-layer", "--target-vector", str(vec), "--steps", "3",
                            "--params", "down"])
    assert r.exit_code == 0, r.output
    assert "the paper's layer 2" in flat(r.output)
    v = load(tmp_path / "v.safetensors", m)
    assert v.meta["block"] == 1 and v.meta["target"] == "vector" and len(v.deltas) == 1
    assert v.meta["distance_before"] == pytest.approx(d0, rel=1e-5)


@pytest.mark.parametrize("args, words", [
    (["--layer", "9"], "layer 9 is out of range"),
    (["--layer", "-4"], "layer -4 is out of range"),
    (["--prompt", ""], "--prompt is empty"),
    (["--target", ""], "give exactly one of --target"),
    (["--target-vector", "DIR"], "give exactly one of --target"),
    (["--token", "40"], "beyond the prompt"),
    (["--out", "DIR"], "is a directory"),
])
def test_fit_selfie_control_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    from typer.testing import CliRunner

    from steerlab.cli import app
    from tiny import model_dir

    d = model_dir(tmp_path)
    (tmp_path / "DIR").mkdir()
    opts = {"--out": str(tmp_path / "c.safetensors"), "--prompt": "hello", "--layer": "1", "--target": "abc"}
    for k, v in zip(args[::2], args[1::2]):
        opts[k] = str(tmp_path / v) if v == "DIR" else v
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(app, ["fit", "selfie-control", "--model", d, *[x for kv in opts.items() for x in kv]])
    assert r.exit_code == 2 and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
