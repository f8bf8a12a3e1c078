"""Scorer registry, the Jigsaw BiLSTM port, profanity, the ensemble default and the token lexicon."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from steerlab.errors import SteerlabError
from steerlab.scoring import (
    DEFAULT_SCORER,
    Scorer,
    ScorerError,
    get_scorer,
    list_scorers,
    register_scorer,
    scorer_throughput,
    token_lexicon,
)
from steerlab.scoring.jigsaw import LABELS, KerasWordTokenizer, _package_dir, _RestrictedUnpickler
from steerlab.scoring.lexicon import lexicon_path

# The package's own published example (toxic-comment-classifier 0.3.0, METADATA / README).
README_SCORES = {"toxic": 0.9889402985572815, "severe_toxic": 0.07256772369146347, "obscene": 0.620429277420044,
                 "threat": 0.01934845559298992, "insult": 0.8664075136184692, "identity_hate": 0.04072948172688484}
README_BATCH = [("I hate you so much!", 0.1395), ("This is wonderful news.", 0.0013), ("You're disgusting!", 0.3110),
                ("Absolutely love your energy!", 0.0088), ("You're the worst person ever!", 0.0937),
                ("Have a nice day :)", 0.0115)]


@pytest.fixture(scope="module")
def jigsaw():
    return get_scorer("jigsaw-bilstm")


# --- registry ----------------------------------------------------------------------------------------

def test_registry_lists_builtins_and_default_alias():
    names = list_scorers()
    for n in ["jigsaw-bilstm", "profanity", "hf-classifier", "detoxify", "perspective", "default", DEFAULT_SCORER]:
        assert n in names
    assert get_scorer("default") is get_scorer(DEFAULT_SCORER)  # cached, alias resolves
    assert get_scorer("Jigsaw_BiLSTM") is get_scorer("jigsaw-bilstm")


def test_unknown_scorer_lists_choices():
    with pytest.raises(ScorerError) as e:
        get_scorer("nope")
    assert isinstance(e.value, SteerlabError)
    assert "'nope'" in str(e.value) and "jigsaw-bilstm" in str(e.value) and "perspective" in str(e.value)


def test_register_scorer_and_overwrite():
    class Constant(Scorer):
        name = "constant-test"
        attributes = ["tox"]

        def __init__(self, value: float = 0.25):
            self.value = value

        def _score(self, texts, batch_size):
            return {"tox": np.full(len(texts), self.value)}

    register_scorer("constant-test", Constant)
    assert get_scorer("constant-test").toxicity(["a", "b"]).tolist() == [0.25, 0.25]
    assert get_scorer("constant-test", value=0.5).toxicity(["a"]).tolist() == [0.5]
    with pytest.raises(ScorerError, match="already registered"):
        register_scorer("constant-test", Constant)
    register_scorer("constant-test", lambda: Constant(0.75), overwrite=True)
    assert get_scorer("constant-test").toxicity(["a"]).tolist() == [0.75]
    # a scorer that returns non-probabilities is caught
    register_scorer("constant-test", lambda: Constant(1.5), overwrite=True)
    with pytest.raises(ScorerError, match=r"outside \[0, 1\]"):
        get_scorer("constant-test").score(["a"])


def test_input_validation(jigsaw):
    out = jigsaw.score([])
    assert list(out) == LABELS and all(v.shape == (0,) and v.dtype == np.float64 for v in out.values())
    with pytest.raises(ScorerError, match="item 1 is int"):
        jigsaw.score(["ok", 3])
    with pytest.raises(ScorerError, match="list of strings"):
        jigsaw.score(None)
    with pytest.raises(ScorerError, match="batch_size"):
        jigsaw.score(["a"], batch_size=0)
    # a bare string is one text
    assert jigsaw.toxicity("You are so dumb and stupid!").shape == (1,)


# --- jigsaw-bilstm -----------------------------------------------------------------------------------

def test_jigsaw_matches_package_readme(jigsaw):
    out = jigsaw.score(["You are so dumb and stupid!"])
    assert jigsaw.attributes == LABELS
    for label, expected in README_SCORES.items():
        # printed as float32 values; our float32 LSTM agrees to float32 rounding
        assert abs(out[label][0] - expected) < 1e-6, label
    # model.predict: mean of the six scores, printed to 4 decimals
    assert f"{np.mean([out[a][0] for a in LABELS]):.4f}" == "0.4347"
    texts = [t for t, _ in README_BATCH]
    batch = jigsaw.score(texts, batch_size=4)  # batching across a boundary changes nothing
    means = np.mean([batch[a] for a in LABELS], axis=0)
    assert [f"{m:.4f}" for m in means] == [f"{v:.4f}" for _, v in README_BATCH]


def _keras_bilstm_numpy(ids: np.ndarray, weights: Path) -> np.ndarray:
    """Keras semantics written out step by step in numpy (the independent reference)."""
    with h5py.File(weights, "r") as f:
        g = {k: f["layers/" + k][()].astype(np.float64) for k in [
            "embedding/vars/0", "dense/vars/0", "dense/vars/1", "dense_1/vars/0", "dense_1/vars/1",
            *[f"bidirectional/{d}_layer/cell/vars/{i}" for d in ("forward", "backward") for i in range(3)]]}

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    def run(x, d):
        kernel, rec, bias = (g[f"bidirectional/{d}_layer/cell/vars/{i}"] for i in range(3))
        u = rec.shape[0]
        h, c, hs = np.zeros(u), np.zeros(u), []
        for xt in x:
            z = xt @ kernel + h @ rec + bias
            i, f, cc, o = z[:u], z[u:2 * u], z[2 * u:3 * u], z[3 * u:]
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(cc)
            h = sigmoid(o) * np.tanh(c)
            hs.append(h)
        return np.array(hs)

    out = []
    for row in ids:
        x = g["embedding/vars/0"][row]
        feats = np.concatenate([run(x, "forward"), run(x[::-1], "backward")[::-1]], axis=1).max(0)
        hidden = np.maximum(feats @ g["dense/vars/0"] + g["dense/vars/1"], 0)
        out.append(sigmoid(hidden @ g["dense_1/vars/0"] + g["dense_1/vars/1"]))
    return np.array(out)


def test_jigsaw_equals_stepwise_keras_reference(jigsaw):
    texts = ["Go to hell, you idiot.", "The recipe needs flour.", ("word " * 130).strip()]
    ids = jigsaw.tokenizer.pad(texts)
    ref = _keras_bilstm_numpy(ids, _package_dir() / "model.weights.h5")
    out = jigsaw.score(texts)
    np.testing.assert_allclose(np.stack([out[a] for a in LABELS], 1), ref, atol=2e-6)


def test_keras_tokenizer_rules(jigsaw):
    tok = jigsaw.tokenizer
    # lower-cased, filter characters become the split character, empties dropped, apostrophes kept
    assert tok.words("Hello, WORLD!! it's\tA-b") == ["hello", "world", "it's", "a", "b"]
    wi = tok.word_index
    assert tok.ids("Hello, WORLD!! it's") == [wi["hello"], wi["world"], wi["it's"]]
    # words ranked >= num_words (20000) are dropped, as Keras does without an OOV token
    with open(_package_dir() / "tokenizer.pickle", "rb") as fh:
        state = _RestrictedUnpickler(fh).load()
    rare = next(w for w, i in state.word_index.items() if i >= 20000 and w.isalpha())
    assert state.num_words == 20000 and tok.ids(f"hello {rare} world") == [wi["hello"], wi["world"]]
    # padding and truncation both at the front (pad_sequences defaults)
    padded = tok.pad(["hello world"])
    assert padded.shape == (1, 100) and padded[0, -2:].tolist() == [wi["hello"], wi["world"]]
    assert not padded[0, :-2].any()


def test_jigsaw_truncates_at_the_front(jigsaw):
    tail = " ".join(["flowers"] * 100)
    long = " ".join(["idiot"] * 50) + " " + tail  # 150 words: Keras keeps the last 100
    a, b, c = jigsaw.toxicity([long, tail, " ".join(["idiot"] * 50)])
    assert a == b and c > 0.5 > a


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "tokenizer.pickle"
    bad.write_bytes(pickle.dumps({"word_index": Evil()}))
    with pytest.raises(ScorerError, match=r"system.*not allowed"):
        KerasWordTokenizer.from_pickle(bad)
    assert not marker.exists()


def test_jigsaw_threads_are_restored(jigsaw):
    before = torch.get_num_threads()
    one = jigsaw.toxicity(TEXTS)  # runs with one torch thread
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(get_scorer("jigsaw-bilstm", threads=None).toxicity(TEXTS), one, atol=1e-6)
    with pytest.raises(ScorerError, match="threads"):
        get_scorer("jigsaw-bilstm", threads=0)


def test_jigsaw_missing_files_are_named(tmp_path):
    with pytest.raises(ScorerError, match="tokenizer.pickle"):
        get_scorer("jigsaw-bilstm", model_dir=tmp_path)


# --- profanity and the default ----------------------------------------------------------------------

TEXTS = ["You are so dumb and stupid!", "Have a nice day :)", "Eat shit and die.", "The train leaves at seven.",
         "I will break every bone in your body."]


def test_profanity_matches_predict_prob():
    from profanity_check import predict_prob

    s = get_scorer("profanity")
    assert s.attributes == ["profanity"]
    np.testing.assert_array_equal(s.score(TEXTS, batch_size=2)["profanity"], predict_prob(TEXTS))


def test_default_is_max_of_jigsaw_and_profanity(jigsaw):
    from profanity_check import predict_prob

    d = get_scorer("default")
    out = d.score(TEXTS)
    assert d.attributes == ["toxicity", "jigsaw-bilstm", "profanity"]
    j, p = jigsaw.toxicity(TEXTS), predict_prob(TEXTS)
    np.testing.assert_array_equal(out["jigsaw-bilstm"], j)
    np.testing.assert_array_equal(out["toxicity"], np.maximum(j, p))
    assert out["toxicity"][2] > 0.9 and out["toxicity"][3] < 0.1
    mean = get_scorer("ensemble", reduce="mean")
    np.testing.assert_allclose(mean.toxicity(TEXTS), (j + p) / 2)
    with pytest.raises(ScorerError, match="'max' or 'mean'"):
        get_scorer("ensemble", reduce="median")


def test_scorer_throughput_counts_texts():
    rate = scorer_throughput("profanity", TEXTS * 20)
    assert rate > 0 and np.isfinite(rate)
    with pytest.raises(ScorerError, match="at least one text"):
        scorer_throughput("profanity", [])


# --- token lexicon -----------------------------------------------------------------------------------

def _tiny_model():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from steerlab.models import Model

    vocab = {"<eos>": 0, "Ġfuck": 1, "Ġtable": 2, "shit": 3, "Ġa": 4, "12": 5, "Ġ!!": 6, "Ġhouse": 7,
             "Ġbitch": 8, "ĠTable": 9, "Ġcafé": 10, "<unk>": 11}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=8, n_layer=1, n_head=2, n_positions=16))
    return Model.wrap(hf, tok, name="tiny-gpt2")


class CountingProfanity(Scorer):
    """alt-profanity-check, counting how many texts it is asked to score."""

    name = "counting-profanity"
    attributes = ["profanity"]

    def __init__(self):
        self.inner = get_scorer("profanity")
        self.texts_scored = 0

    def _score(self, texts, batch_size):
        self.texts_scored += len(texts)
        return self.inner.score(texts)


def test_token_lexicon_scores_words_and_caches(tmp_path, monkeypatch):
    from profanity_check import predict_prob

    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    model = _tiny_model()
    scorer = CountingProfanity()
    ids, scores = token_lexicon(model, scorer)
    # word-like: alphabetic ASCII, >= 2 letters, not special; "a", "12", "!!", "café", <eos>, <unk> are not
    assert ids.tolist() == [1, 2, 3, 7, 8, 9]
    words = ["fuck", "table", "shit", "house", "bitch", "Table"]
    np.testing.assert_array_equal(scores, predict_prob([f"This is {w}." for w in words]))
    by_word = dict(zip(words, scores, strict=True))
    assert min(by_word["fuck"], by_word["shit"], by_word["bitch"]) > 0.5 > max(by_word["table"], by_word["house"])
    assert scorer.texts_scored == 6  # each distinct word once
    path = lexicon_path(model, scorer)
    assert path.exists() and path.parent == tmp_path / "lexicons"
    assert not list(path.parent.glob("*.tmp"))
    ids2, scores2 = token_lexicon(model, scorer)
    assert scorer.texts_scored == 6  # read back, not rescored
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(scores2, scores)
    # another carrier is another lexicon; cache=False always rescores
    token_lexicon(model, scorer, carrier="{}")
    assert scorer.texts_scored == 12
    token_lexicon(model, scorer, cache=False)
    assert scorer.texts_scored == 18
    # a damaged cache file is recomputed, not trusted
    path.write_bytes(b"not an npz")
    _, scores3 = token_lexicon(model, scorer)
    np.testing.assert_array_equal(scores3, scores)
    assert scorer.texts_scored == 24


def test_token_lexicon_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path))
    model = _tiny_model()
    with pytest.raises(ScorerError, match="exactly one"):
        token_lexicon(model, "profanity", carrier="no slot")
    with pytest.raises(ScorerError, match="steerlab Model"):
        token_lexicon(object(), "profanity")


def test_compare_scorers_hand_worked():
    from steerlab.scoring import compare_scorers

    table_a = {"a": 0.1, "b": 0.2, "c": 0.6, "d": 0.9}
    table_b = {"a": 0.2, "b": 0.1, "c": 0.7, "d": 0.4}

    class Table(Scorer):
        attributes = ["tox"]

        def __init__(self, name, table):
            self.name, self.table = name, table

        def _score(self, texts, batch_size):
            return {"tox": np.array([self.table[t] for t in texts])}

    r = compare_scorers(Table("ta", table_a), Table("tb", table_b), ["a", "b", "c", "d"])
    # ranks 1,2,3,4 vs 2,1,4,3: sum d^2 = 4, rho = 1 - 6*4/(4*15) = 0.6
    assert r["spearman"] == pytest.approx(0.6)
    assert r["pearson"] == pytest.approx(np.corrcoef(list(table_a.values()), list(table_b.values()))[0, 1])
    # flags 0011 vs 0010: agree 3/4; chance 0.5*0.25 + 0.5*0.75 = 0.5; kappa (0.75-0.5)/0.5
    assert r["agreement"] == 0.75 and r["kappa"] == pytest.approx(0.5)
    assert r["flagged_a"] == 0.5 and r["flagged_b"] == 0.25 and r["n"] == 4
