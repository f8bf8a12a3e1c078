"""FFN concepts: PCA against numpy's SVD, the vocabulary reading, and both labellers (the HTTP one
against a loopback server)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from steerlab.errors import SiteError, SteerlabError
from steerlab.explain.ffn import (
    LabellerError,
    LocalLabeller,
    OpenAILabeller,
    explain_ffn,
    label_layers,
    parse_label,
    pca,
    value_vectors,
    word_vocab,
)
from tiny import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pca_matches_numpy_svd(arch):
    m = tiny_model(arch)
    W = value_vectors(m, 1).numpy().astype(np.float64)
    assert W.shape == (m.d_mlp, m.d_model)
    # independent: the down projection applied to unit neuron activations gives the value vectors
    down = m.layer(1).mlp.down_proj if arch == "llama" else m.layer(1).mlp.c_proj
    ref_rows = down(torch.eye(m.d_mlp)).detach().numpy() - (down.bias.detach().numpy() if down.bias is not None else 0)
    np.testing.assert_allclose(W, ref_rows, atol=1e-5)
    X = W - W.mean(0)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    comps, evr = pca(torch.tensor(W, dtype=torch.float32), 5)
    np.testing.assert_allclose(evr.numpy(), (S ** 2 / (S ** 2).sum())[:5], atol=1e-5)
    # components agree up to sign
    dots = np.abs((comps.numpy().astype(np.float64) * Vt[:5]).sum(1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-4)


def test_character_vocabulary_has_no_words():
    m = tiny_model("llama")
    ids, words = word_vocab(m)
    assert words == []  # a character vocabulary has no two-letter words
    with pytest.raises(Exception, match="no word-like tokens"):
        explain_ffn(m, layers=[0])


def test_explain_ffn_on_real_vocab_words(monkeypatch):
    m = tiny_model("llama")
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    monkeypatch.setattr("steerlab.explain.ffn.word_vocab", lambda model: (ids, words))
    (fl,) = explain_ffn(m, layers=[-1], k=3, n_components=4)
    assert fl.layer == 2 and fl.components.shape == (4, m.d_model) and len(fl.words) == 4
    U = m.W_U.detach().numpy()[ids.numpy()].astype(np.float64)
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    sc = np.abs(fl.components.astype(np.float64) @ U.T)
    for r in range(4):
        order = np.argsort(-sc[r])[:3]
        assert fl.words[r] == [words[j] for j in order]
        np.testing.assert_allclose(fl.scores[r], sc[r, order], atol=1e-5)
    np.testing.assert_allclose(fl.evr.sum() <= 1.0 + 1e-6, True)


def test_missing_module_is_a_site_error():
    m = tiny_model("llama")
    del m.layer(0).mlp.down_proj
    with pytest.raises(SiteError, match="no MLP down projection"):
        value_vectors(m, 0)


def test_parse_label():
    assert parse_label("level: Semantics; task: Coding") == {"level": "semantics", "task": "coding"}
    assert parse_label("no idea") == {"level": "cannot tell", "task": "cannot tell"}
    assert parse_label("level: cannot tell; task: math") == {"level": "cannot tell", "task": "math"}
    assert parse_label("level: syntax; task: cannot tell (maybe writing)") == {"level": "syntax", "task": "cannot tell"}


def test_consensus_over_seeds():
    from steerlab.explain.ffn import consensus

    runs = [{"level": "syntax", "task": "math"}, {"level": "syntax", "task": "coding"},
            {"level": "semantics", "task": "none"}, {"level": "syntax", "task": "math"}]
    c = consensus(runs)
    assert c["level"] == "syntax" and c["level_agreement"] == 0.75 and c["runs"] == 4
    assert c["task"] == "cannot tell" and c["task_agreement"] == 0.5  # math in 2 of 4: not more than half
    assert consensus(runs[:2] + runs[3:])["task"] == "math"  # 2 of 3
    assert c["level_votes"] == ["syntax", "syntax", "semantics", "syntax"]


class _SeededLabeller:
    """A labeller whose answer depends on the seed only (a stand-in for a sampling model)."""

    def __init__(self):
        self.calls = []

    def label(self, words, seed=None):
        self.calls.append(seed)
        return parse_label("level: syntax; task: math" if seed in (None, 0, 1, 2) else "level: semantics; task: none")


def test_label_layers_over_several_seeds(monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setattr("steerlab.explain.ffn.word_vocab", lambda model: (torch.tensor([5, 6, 7]), ["ab", "cd", "ef"]))
    layers = explain_ffn(m, layers=[0], k=2, n_components=2)
    lab = _SeededLabeller()
    label_layers(layers, lab, n_pcs=2, seeds=5)
    assert lab.calls == [0, 1, 2, 3, 4] * 2
    assert layers[0].labels[0]["level"] == "syntax" and layers[0].labels[0]["level_agreement"] == 0.6
    with pytest.raises(SteerlabError, match="seeds must be >= 1"):
        label_layers(layers, lab, n_pcs=2, seeds=0)
    # the local labeller samples with a seed: the same seed gives the same answer
    local = LocalLabeller(m, max_new_tokens=4)
    assert local.label(["ab", "cd"], seed=3)["answer"] == local.label(["ab", "cd"], seed=3)["answer"]


class _Handler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, body, self.headers.get("Authorization")))
        answer = {"choices": [{"message": {"content": "level: syntax; task: translation"}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_openai_labeller_against_loopback_server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        lab = OpenAILabeller(f"http://127.0.0.1:{srv.server_port}/v1", "some-model", api_key="k")
        out = lab.label(["the", "of", "and"])
        lab.label(["the"], seed=2)
        seeded = _Handler.seen[-1][1]
    finally:
        srv.shutdown()
    assert out["level"] == "syntax" and out["task"] == "translation"
    assert seeded["seed"] == 2 and seeded["temperature"] == 0.7
    path, body, auth = _Handler.seen[-2]
    assert path == "/v1/chat/completions" and body["model"] == "some-model" and auth == "Bearer k"
    assert "the, of, and" in body["messages"][0]["content"]
    with pytest.raises(LabellerError, match="failed"):
        OpenAILabeller(f"http://127.0.0.1:{srv.server_port}/v1", "m", timeout=0.5).label(["x"])


def test_local_labeller_and_label_layers(monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setattr("steerlab.explain.ffn.word_vocab", lambda model: (torch.tensor([5, 6, 7]), ["ab", "cd", "ef"]))
    layers = explain_ffn(m, layers=[0], k=2, n_components=2)
    label_layers(layers, LocalLabeller(m, max_new_tokens=3), n_pcs=2)
    assert len(layers[0].labels) == 2
    assert all(set(lab) == {"level", "task", "answer"} for lab in layers[0].labels)
    assert layers[0].labels[0]["answer"].startswith("level:")


# --- a tiny model with a word-level vocabulary, for the command line and the comparison ------------
def word_model(seed: int = 0, save_to=None):
    """A tiny random llama whose tokenizer has one token per frequent English word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from steerlab.explain.heads import english_words
    from steerlab.models.model import Model

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", ".", ",", ":", "?", *english_words(300)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    if save_to is not None:
        hf.save_pretrained(save_to)
        tok.save_pretrained(save_to)
        return str(save_to)
    return Model.wrap(hf, tok, name=f"words-{seed}")


def test_ffn_cli_and_labeller_choice(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app

    d = word_model(save_to=tmp_path / "w")
    r = CliRunner().invoke(app, ["ffn", "--model", d, "--layers", "0,-1", "--pcs", "2", "--top", "5"])
    assert r.exit_code == 0, r.output
    assert "FFN components" in r.output and r.output.count("│ 0 ") + r.output.count("│ 3 ") >= 2
    r = CliRunner().invoke(app, ["ffn", "--model", d, "--labeller-url", "http://x", "--labeller-local", d])
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(app, ["ffn", "--model", d, "--layers", "9"])
    assert r.exit_code == 2 and "out of range" in r.output


def test_instruction_shift_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from steerlab.cli import app

    a, b = word_model(0, tmp_path / "a"), word_model(1, tmp_path / "b")
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["instruction-shift", "--base", a, "--tuned", b, "--out", str(out), "--words", "200",
                                 "--pcs", "3", "--raw"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tests"]) >= {"base_vs_tuned", "followed_vs_unfollowed_base"}
    assert any(k.startswith("verbs ") for k in summary["tests"])
    assert summary["tests"]["base_vs_tuned"]["n_a"] == 20 and summary["config"]["raw"] is True
    assert "followed_vs_unfollowed_tuned (raw density, not the paper's)" in summary["tests"]
    for f in ("head_verbs.csv", "head_pairs.csv", "ffn_components.csv", "ffn_overlap.csv", "instruction_scores.csv"):
        assert (out / "tables" / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "Instruction-tuning shift" in html and "data:image/png;base64" in html
    # the scores table agrees with an independent recomputation of one item
    from steerlab.explain.attribution import attribute
    from steerlab.explain.attribution_study import load_annotated
    from steerlab.models import load

    item = load_annotated("example")[0]
    ref = attribute(load(a), item["prompt"], item["response"]).instruction_score(item["instruction"])
    import csv

    rows = list(csv.DictReader(open(out / "tables" / "instruction_scores.csv")))
    got = [float(r["score"]) for r in rows if r["model"] == "base" and r["id"] == item["id"]][0]
    assert got == pytest.approx(ref, rel=1e-6)


def test_word_vocab_prefers_word_initial_tokens():
    from types import SimpleNamespace

    toks = ["\u0120the", "ing", "\u2581cat", "\u0120a", "\u0120x1", "dog", "\u0120the"]

    class Tok:
        def __len__(self):
            return len(toks)

        def convert_ids_to_tokens(self, ids):
            return [toks[i] for i in ids]

    m = SimpleNamespace(tok=Tok(), vocab_size=len(toks))
    ids, words = word_vocab(m)
    assert ids.tolist() == [0, 2] and words == ["the", "cat"]
