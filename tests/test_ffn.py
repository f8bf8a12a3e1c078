"""FFN concepts: PCA against numpy's SVD, the vocabulary reading, and both labellers (the HTTP one
against a loopback server)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from steerlab.errors import SiteError
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
    assert parse_label("no idea") == {"level": "unknown", "task": "unknown"}


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
    finally:
        srv.shutdown()
    assert out["level"] == "syntax" and out["task"] == "translation"
    path, body, auth = _Handler.seen[-1]
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
