"""scorer_from_spec: scorers and their options from command-line text (NAME[:VALUE] plus KEY=VALUE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerlab.scoring import ScorerError, get_scorer, register_scorer
from steerlab.scoring.registry import Scorer, parse_option_value, scorer_from_spec, scorer_options

WORDS = ["you", "are", "a", "stupid", "idiot", "have", "nice", "day", "the", "train", "leaves"]
TEXTS = ["you are a stupid idiot", "have a nice day", "the train leaves", "idiot", "you are a nice idiot"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny random BERT sequence classifier saved to a local directory (a stand-in for a hub model)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("clf")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab)
    labels = {0: "neutral", 1: "toxic"}
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2, initializer_range=0.5,
                     id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _logits(model, tok, max_length: int | None = None) -> torch.Tensor:
    """Logits of each text alone (no padding, no batching): [len(TEXTS), 2]."""
    out = []
    for t in TEXTS:
        enc = tok(t, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
        with torch.no_grad():
            out.append(model(**enc).logits[0])
    return torch.stack(out)


def _reference(model, tok, max_length: int | None = None) -> np.ndarray:
    return torch.softmax(_logits(model, tok, max_length), -1).numpy()


def test_main_argument_and_options_reach_the_scorer(classifier):
    path, model, tok = classifier
    ref = _reference(model, tok)
    s = scorer_from_spec(f"hf-classifier:{path}")
    assert s.model_id == str(path) and s.attributes == ["toxic", "neutral"]
    np.testing.assert_allclose(s.toxicity(TEXTS), ref[:, 1], atol=1e-5)
    # options: a label by index (parsed as int) and by name, a truncation length, an activation
    ref3 = _reference(model, tok, max_length=3)
    assert not np.allclose(ref3, ref)                                   # truncation matters here
    for label in ("0", "neutral", "NEUTRAL"):
        s2 = scorer_from_spec(f"HF_Classifier:{path}", [f"label={label}", "max-length=3", "activation=softmax"])
        assert s2.max_length == 3 and s2.attributes[0] == "neutral"
        np.testing.assert_allclose(s2.toxicity(TEXTS), ref3[:, 0], atol=1e-5)
    # the main argument as an option works too
    s3 = scorer_from_spec("hf-classifier", [f"model={path}", "activation=sigmoid"])
    assert s3.activation == "sigmoid"
    np.testing.assert_allclose(s3.toxicity(TEXTS), torch.sigmoid(_logits(model, tok)[:, 1]).numpy(), atol=1e-5)


def test_detoxify_checkpoint_is_the_main_argument(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ScorerError, match=f"Detoxify checkpoint {missing} does not exist"):
        scorer_from_spec(f"detoxify:{missing}")
    with pytest.raises(ScorerError, match="unknown Detoxify model_type 'huge'"):
        scorer_from_spec(f"detoxify:{missing}", ["model_type=huge"])


def test_plain_names_are_get_scorer():
    assert scorer_from_spec("default") is get_scorer("default")
    assert scorer_from_spec("Jigsaw_BiLSTM") is get_scorer("jigsaw-bilstm")
    s = scorer_from_spec("jigsaw-bilstm", ["threads=2"])
    assert s.threads == 2 and s is not get_scorer("jigsaw-bilstm")
    np.testing.assert_allclose(s.toxicity(TEXTS), get_scorer("jigsaw-bilstm").toxicity(TEXTS), atol=1e-6)


@pytest.mark.parametrize("spec, options, pattern", [
    ("profanity:x", (), r"scorer 'profanity' takes no main argument.*hf-classifier:MODEL, detoxify:CHECKPOINT"),
    ("default:x", (), "takes no main argument"),
    ("hf-classifier:", (), "nothing after ':'"),
    ("nope", (), "unknown scorer 'nope'; choose one of .*perspective"),
    ("", (), "non-empty string"),
    ("hf-classifier:m", ["labl=1"], r"has no option 'labl'; accepted keywords: activation, device, dtype, "
                                    r"label, max_length, model"),
    ("hf-classifier:m", ["label"], r"malformed option 'label' .*KEY=VALUE; accepted keywords: activation"),
    ("hf-classifier:m", ["=3"], "malformed option '=3'"),
    ("hf-classifier:m", ["2x=3"], "malformed option '2x=3'"),
    ("hf-classifier:m", ["model=other"], r"option 'model' \(also given as hf-classifier:VALUE\) given twice"),
    ("perspective", ["qps=1", "qps=2"], "option 'qps' given twice"),
    ("perspective", ["api-kee=x"], r"no option 'api_kee'; accepted keywords: api_key, attributes, backoff"),
    ("default", ["threads=1"], r"scorer 'jigsaw-profanity-max' has no option 'threads'; accepted keywords: "
                               r"\(none\)"),
    ("profanity", ["x=1"], r"no option 'x'; accepted keywords: \(none\)"),
])
def test_bad_specs_and_options_are_named(spec, options, pattern):
    with pytest.raises(ScorerError, match=pattern):
        scorer_from_spec(spec, options)


def test_option_values_are_typed():
    assert parse_option_value("true") is True and parse_option_value("FALSE") is False
    assert parse_option_value("12") == 12 and isinstance(parse_option_value("-3"), int)
    assert parse_option_value("0.5") == 0.5 and parse_option_value("1e-3") == 0.001
    assert parse_option_value("inf") == float("inf")
    for text in ("toxic", "1.2.3", "s-nlp/roberta", "nan", "", "0x10", "yes"):
        assert parse_option_value(text) == text


def test_registered_scorers_get_checked_options():
    class Fixed(Scorer):
        name = "fixed-spec-test"
        attributes = ["tox"]

        def __init__(self, value: float = 0.25, flag: bool = False):
            self.value, self.flag = value, flag

        def _score(self, texts, batch_size):
            return {"tox": np.full(len(texts), self.value)}

    register_scorer("fixed-spec-test", Fixed, overwrite=True)
    assert scorer_options("fixed-spec-test") == ["flag", "value"]
    s = scorer_from_spec("fixed-spec-test", ["value=0.75", "flag=true"])
    assert s.toxicity(["a"]).tolist() == [0.75] and s.flag is True
    with pytest.raises(ScorerError, match="accepted keywords: flag, value"):
        scorer_from_spec("fixed-spec-test", ["valu=1"])
    # a factory taking **kwargs cannot be checked beforehand: options pass through
    register_scorer("fixed-spec-test", lambda **kw: Fixed(**kw), overwrite=True)
    assert scorer_options("fixed-spec-test") is None
    assert scorer_from_spec("fixed-spec-test", ["value=0"]).toxicity(["a"]).tolist() == [0.0]
