"""hf-classifier and detoxify scorers, on tiny random-weight classifiers built and saved in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerlab.scoring import ScorerError, get_scorer
from steerlab.scoring.hf import DETOXIFY_URLS, pick_label

WORDS = ["you", "are", "a", "stupid", "idiot", "have", "nice", "day", "the", "train", "leaves", "at", "seven"]
TEXTS = ["you are a stupid idiot", "have a nice day", "the train leaves at seven", "idiot",
         "you are a nice idiot the train"]


def _bert_dir(path, labels: dict[int, str], problem_type: str | None = None):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=len(labels),
                     initializer_range=0.5, id2label=labels, label2id={v: k for k, v in labels.items()}, problem_type=problem_type)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def _direct(model, tok, text, activation, max_length=None):
    """One text at a time, no padding: the reference the batched scorer must match."""
    enc = tok(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return (torch.softmax(logits, -1) if activation == "softmax" else torch.sigmoid(logits)).numpy()


def test_hf_classifier_softmax_matches_direct_forward(tmp_path):
    model, tok = _bert_dir(tmp_path, {0: "neutral", 1: "toxic"})
    s = get_scorer("hf-classifier", model=str(tmp_path))
    assert s.attributes == ["toxic", "neutral"] and s.activation == "softmax"
    out = s.score(TEXTS, batch_size=2)  # length-sorted batches with padding
    ref = np.array([_direct(model, tok, t, "softmax") for t in TEXTS])
    np.testing.assert_allclose(out["toxic"], ref[:, 1], atol=1e-5)
    np.testing.assert_allclose(out["neutral"], ref[:, 0], atol=1e-5)
    np.testing.assert_allclose(out["toxic"] + out["neutral"], 1.0, atol=1e-6)
    # label chosen by the caller; truncation to max_length
    s2 = get_scorer("hf-classifier", model=str(tmp_path), label="neutral", max_length=4)
    ref4 = np.array([_direct(model, tok, t, "softmax", max_length=4) for t in TEXTS])
    np.testing.assert_allclose(s2.toxicity(TEXTS), ref4[:, 0], atol=1e-5)
    assert not np.allclose(ref4[:, 0], ref[:, 0])  # truncation mattered


def test_hf_classifier_gpt2_multilabel_sigmoid(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<eos>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    labels = {0: "insult", 1: "toxicity", 2: "threat"}
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=3,
                     initializer_range=0.5, id2label=labels, label2id={v: k for k, v in labels.items()},
                     problem_type="multi_label_classification")
    torch.manual_seed(1)
    model = GPT2ForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    s = get_scorer("hf-classifier", model=str(tmp_path))  # no pad token: the scorer pads with EOS
    assert s.attributes == ["toxicity", "insult", "threat"] and s.activation == "sigmoid"
    out = s.score(TEXTS, batch_size=3)
    ref = np.array([_direct(model, tok, t, "sigmoid") for t in TEXTS])
    for j, name in labels.items():
        np.testing.assert_allclose(out[name], ref[:, j], atol=1e-5)


def test_pick_label_rules():
    assert pick_label({0: "non-toxic", 1: "toxic"}, None, "m") == 1
    assert pick_label({0: "neutral", 1: "toxic"}, None, "m") == 1
    assert pick_label({0: "toxicity", 1: "severe_toxicity", 2: "insult"}, None, "m") == 0
    assert pick_label({0: "normal", 1: "offensive", 2: "hate speech"}, None, "m") == 2
    assert pick_label({0: "LABEL_0", 1: "LABEL_1"}, 1, "m") == 1
    assert pick_label({0: "Neutral", 1: "Toxic"}, "neutral", "m") == 0
    with pytest.raises(ScorerError, match=r"which label of m.*label=NAME"):
        pick_label({0: "LABEL_0", 1: "LABEL_1"}, None, "m")
    with pytest.raises(ScorerError, match=r"no label named 'spam'.*0='neutral'"):
        pick_label({0: "neutral", 1: "toxic"}, "spam", "m")
    with pytest.raises(ScorerError, match="no label index 5"):
        pick_label({0: "neutral", 1: "toxic"}, 5, "m")


def test_hf_classifier_load_errors(tmp_path):
    with pytest.raises(ScorerError, match="needs model="):
        get_scorer("hf-classifier")
    with pytest.raises(ScorerError, match="cannot load sequence classifier"):
        get_scorer("hf-classifier", model=str(tmp_path))  # an empty directory


# --- detoxify ----------------------------------------------------------------------------------------

JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def _detoxify_checkpoint(tmp_path):
    """A stand-in in Detoxify's checkpoint format: {"config": {...}, "state_dict": {...}}, saved with torch.
    Its LayerNorm parameters use the old gamma/beta names of early BERT checkpoints."""
    cfg_dir = tmp_path / "bert-config"
    model, tok = _bert_dir(cfg_dir, {i: n for i, n in enumerate(JIGSAW)}, "multi_label_classification")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in model.state_dict().items()}
    ckpt = {"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                         "model_name": "BertForSequenceClassification",
                                         "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                       "dataset": {"args": {"classes": JIGSAW}}},
            "state_dict": state}
    path = tmp_path / "toxic_original-c1212f89.ckpt"
    torch.save(ckpt, path)
    return path, cfg_dir, model, tok


def test_detoxify_checkpoint_matches_direct_forward(tmp_path, monkeypatch):
    path, cfg_dir, model, tok = _detoxify_checkpoint(tmp_path)
    s = get_scorer("detoxify", checkpoint=path, config_path=cfg_dir)
    assert s.attributes == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    out = s.score(TEXTS, batch_size=2)
    ref = np.array([_direct(model, tok, t, "sigmoid") for t in TEXTS])
    for j, name in enumerate(s.labels):
        np.testing.assert_allclose(out[name], ref[:, j], atol=1e-5)
    # found in the torch hub cache, where the detoxify package keeps downloads
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / DETOXIFY_URLS["original"].rsplit("/", 1)[1]).write_bytes(path.read_bytes())
    s2 = get_scorer("detoxify", config_path=cfg_dir)
    np.testing.assert_allclose(s2.toxicity(TEXTS), ref[:, 0], atol=1e-5)


def test_detoxify_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(ScorerError) as e:
        get_scorer("detoxify")
    msg = str(e.value)
    assert "checkpoint=" in msg and "toxic_original-c1212f89.ckpt" in msg and "download=True" in msg
    with pytest.raises(ScorerError, match="unknown Detoxify model_type"):
        get_scorer("detoxify", model_type="huge")
    bad = tmp_path / "bad.ckpt"
    torch.save({"weights": {}}, bad)
    with pytest.raises(ScorerError, match="'config' and 'state_dict'"):
        get_scorer("detoxify", checkpoint=bad)
    with pytest.raises(ScorerError, match="does not exist"):
        get_scorer("detoxify", checkpoint=tmp_path / "missing.ckpt")
    path, cfg_dir, _, _ = _detoxify_checkpoint(tmp_path)
    with pytest.raises(ScorerError, match="pass config_path=DIR"):
        get_scorer("detoxify", checkpoint=path, config_path=tmp_path / "no-such-dir")
