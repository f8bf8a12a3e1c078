"""Attention-head word pairs: folded weights against the modules, a planted query-key pair, the
thresholds by hand, bad input."""

import numpy as np
import pytest
import torch

from steerlab.errors import SiteError
from steerlab.explain.heads import english_words, explain_heads, qk_weights, thresholds, word_embeddings
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
def test_qk_weights_equal_the_modules(arch):
    m = tiny_model(arch)
    attn, block = m.layer(1).self_attn, m.layer(1)
    with torch.no_grad():
        block.input_layernorm.weight.normal_(0, 0.5)
        for n in ("q_norm", "k_norm"):
            if hasattr(attn, n):
                getattr(attn, n).weight.normal_(0, 0.5)
    before = attn.q_proj.weight.clone()
    wq, wk = qk_weights(m, 1)
    assert torch.equal(attn.q_proj.weight, before)  # the model is not modified
    H, Hkv, dh = m.n_heads, m.n_kv_heads, m.d_head
    x = torch.randn(5, m.d_model)
    gemma = arch.startswith("gemma")
    gain = lambda w: (1 + w) if gemma else w  # noqa: E731
    xin = x * gain(block.input_layernorm.weight)
    q = attn.q_proj(xin).view(5, H, dh)
    k = attn.k_proj(xin).view(5, Hkv, dh)
    if hasattr(attn, "q_norm"):
        q, k = q * gain(attn.q_norm.weight), k * gain(attn.k_norm.weight)
    k = k.repeat_interleave(H // Hkv, dim=1)
    np.testing.assert_allclose(torch.einsum("nd,hrd->nhr", x, wq).detach().numpy(), q.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(torch.einsum("nd,hrd->nhr", x, wk).detach().numpy(), k.detach().numpy(), atol=1e-4)


def test_word_embeddings_are_mean_sub_token_rows():
    m = tiny_model("llama")
    E = word_embeddings(m, ["ab", "xyz"])
    W = m.hf.get_input_embeddings().weight.detach()
    ids = m.tok([" ab"], add_special_tokens=False)["input_ids"][0]
    assert len(ids) == 3
    np.testing.assert_allclose(E[0].numpy(), W[ids].mean(0).numpy(), atol=1e-6)


def test_thresholds_by_hand():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    S = X @ X.T
    thr = thresholds(torch.tensor(S), n_frequent=4).numpy()
    for w in range(6):
        others = [S[w, j] for j in range(4) if j != w]
        assert thr[w] == pytest.approx(np.mean(others) + 1.96 * np.std(others, ddof=1), abs=1e-6)


def test_planted_query_key_pair_is_found():
    m = tiny_model("llama")
    torch.manual_seed(1)
    u = torch.randn(m.d_model)
    u /= u.norm()
    vocab = m.tok.get_vocab()
    with torch.no_grad():
        W = m.hf.get_input_embeddings().weight
        W -= (W @ u)[:, None] * u[None]  # every token orthogonal to u ...
        for c in "QZ":
            W[vocab[c]] += 3.0 * u  # ... except Q and Z
        a = m.layer(0).self_attn
        a.q_proj.weight[:8] *= 0.01
        a.k_proj.weight[:8] *= 0.01
        a.q_proj.weight[0] = 5.0 * u  # head 0, dimension 0 reads u
        a.k_proj.weight[0] = 5.0 * u  # its key head (0) too
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnoprstuvwxy")
    words = ["".join(rng.choice(letters, 3)) for _ in range(40)] + ["QZ", "ZQ"]
    (res,) = explain_heads(m, layers=[0], words=words, k=4, n_frequent=40)
    assert res.similarity == "embeddings" and res.energy.shape == (4, 8)
    best = res.pairs[0][0]
    assert {best[0], best[1]} == {"QZ", "ZQ"} and best[3] == 0 and best[2] > 0.99
    # the top-energy dimension of head 0 is the planted one
    assert res.energy[0, 0] > 10 * res.energy[0, 1]


def test_bad_input():
    m = tiny_model("llama")
    with pytest.raises(SiteError, match="out of range"):
        explain_heads(m, layers=[7], words=["ab", "cd"])
    del m.layer(0).self_attn.q_proj
    with pytest.raises(SiteError, match="no query/key projections"):
        qk_weights(m, 0)
    with pytest.raises(Exception, match="at least 2 words"):
        explain_heads(m, layers=[1], words=["ab"])


def test_english_words():
    ws = english_words(50)
    assert len(ws) == 50 and ws[0] == "the" and all(w.isalpha() for w in ws)


def test_heads_cli(tmp_path):
    import csv

    from typer.testing import CliRunner

    from steerlab.cli import app

    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    out = tmp_path / "pairs.csv"
    r = CliRunner().invoke(app, ["heads", "--model", str(d), "--layers", "0", "--words", "60", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "head word pairs" in r.output
    ref = explain_heads(m, layers=[0], n_words=60)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == sum(len(p) for p in ref[0].pairs)
    if rows:
        k, q, _, _ = ref[0].pairs[int(rows[0]["head"])][0]
        assert rows[0]["pair"] == f"{k}={q}"
    r = CliRunner().invoke(app, ["heads", "--model", str(d), "--similarity", "glove", "--words", "10"])
    assert r.exit_code == 2 and "unknown similarity" in r.output


def test_minilm_similarity():
    from steerlab.explain.heads import similarity_matrix
    from steerlab.metrics.text import sentence_encoder

    m = tiny_model("llama")
    words = ["cat", "dog", "car"]
    S = similarity_matrix(m, words, word_embeddings(m, words), "minilm").numpy()
    X = sentence_encoder().encode(words, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(S, X @ X.T, atol=1e-5)
