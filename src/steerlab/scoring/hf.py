"""Transformer classifiers: ``hf-classifier`` (any transformers sequence-classification model, e.g.
``s-nlp/roberta_toxicity_classifier``) and ``detoxify`` (a Detoxify checkpoint file).

Both run batched, with texts sorted by length so that a batch pads little, truncated at the model's
maximum length, and give probabilities: softmax over labels for a single-label classifier, a sigmoid
per label for a multi-label one (``problem_type == "multi_label_classification"``, one output, and
always for Detoxify, whose heads are trained with a sigmoid per label).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..registry import choose
from .registry import Scorer, ScorerError

# label-name words that mark the toxic class, most specific first
_TOXIC_WORDS = ("toxic", "hate", "offensive", "abusive", "insult", "profan")
_NEGATED_PREFIXES = ("non", "not", "no-", "no_", "no ")
_BENIGN_NAMES = {"neutral", "normal", "clean", "safe", "ok", "none"}


def pick_label(id2label: dict[int, str], label: str | int | None, model: str) -> int:
    """Index of the toxic label: ``label`` as an index or a name (case-insensitive), or, when None, the
    one label whose name contains a toxicity word ("toxic", then "hate", "offensive", ...) and is not
    negated ("non-toxic", "not_hate")."""
    names = {int(i): str(n) for i, n in id2label.items()}
    listing = ", ".join(f"{i}={n!r}" for i, n in sorted(names.items()))
    if isinstance(label, bool):
        raise ScorerError(f"label must be a name or an index, got {label!r}")
    if isinstance(label, int):
        if label not in names:
            raise ScorerError(f"{model} has no label index {label}; its labels: {listing}")
        return label
    if isinstance(label, str):
        hits = [i for i, n in names.items() if n.lower() == label.lower()]
        if not hits:
            raise ScorerError(f"{model} has no label named {label!r}; its labels: {listing}")
        return hits[0]
    if label is not None:
        raise ScorerError(f"label must be a name or an index, got {type(label).__name__}")
    positive = {i: n.lower() for i, n in names.items()
                if not n.lower().startswith(_NEGATED_PREFIXES) and n.lower() not in _BENIGN_NAMES}
    for word in _TOXIC_WORDS:
        hits = [i for i, n in positive.items() if word in n]
        exact = [i for i in hits if positive[i] in (word, word + "ity", word + "ic")]
        if len(hits) == 1 or len(exact) == 1:
            return hits[0] if len(hits) == 1 else exact[0]
        if hits:
            break
    raise ScorerError(f"cannot tell which label of {model} is the toxic one (labels: {listing}); "
                      "pass label=NAME or label=INDEX")


def _activation(config, activation: str) -> str:
    if activation not in ("auto", "softmax", "sigmoid"):
        raise ScorerError(f"activation must be 'auto', 'softmax' or 'sigmoid', got {activation!r}")
    if activation != "auto":
        return activation
    if getattr(config, "problem_type", None) == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


@torch.inference_mode()
def classify(model, tok, texts: list[str], batch_size: int, max_length: int, activation: str) -> np.ndarray:
    """Probabilities ``[len(texts), num_labels]`` from a sequence classifier, in batches of texts of
    similar length (results in the input order)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float64)
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
        probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)
        out[idx] = probs.cpu().numpy()
    return out


def _max_length(tok, config, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    limits = [n for n in (getattr(tok, "model_max_length", None), getattr(config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def _prepare(model, tok) -> None:
    """Give a tokenizer without a pad token its EOS token (GPT-2 style classifiers) and tell the model."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ScorerError("the classifier's tokenizer has neither a pad nor an EOS token: cannot batch")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()


class HFClassifierScorer(Scorer):
    """Any transformers sequence classifier: a hub id or a local directory (``model=``).

    ``label`` picks the toxic class (name or index; by default the one whose name says toxic, see
    :func:`pick_label`); ``activation`` is ``auto`` (softmax, or sigmoid for multi-label models),
    ``softmax`` or ``sigmoid``. Attributes: the toxic label's name, then the other labels' names.
    """

    name = "hf-classifier"
    batch_size = 32

    def __init__(self, model: str | os.PathLike | None = None, label: str | int | None = None,
                 activation: str = "auto", device: str = "cpu", max_length: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if model is None:
            raise ScorerError("scorer 'hf-classifier' needs model=HUB_ID_OR_LOCAL_DIR, "
                              "e.g. model='s-nlp/roberta_toxicity_classifier'")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_id = str(model)
        try:
            self.tok = AutoTokenizer.from_pretrained(self.model_id)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.model_id, dtype=dtype).to(device)
        except (OSError, ValueError) as e:
            where = "local directory" if Path(self.model_id).is_dir() else "hub id (needs the network or the HF cache)"
            raise ScorerError(f"cannot load sequence classifier {self.model_id!r} as a {where}: {e}") from e
        _prepare(self.model, self.tok)
        cfg = self.model.config
        id2label = cfg.id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
        self.label_index = pick_label(id2label, label, self.model_id)
        self.activation = _activation(cfg, activation)
        self.max_length = _max_length(self.tok, cfg, max_length)
        self.labels = [str(id2label[i]) for i in range(cfg.num_labels)]
        self.attributes = [self.labels[self.label_index]] + [n for i, n in enumerate(self.labels)
                                                              if i != self.label_index]

    @property
    def key(self) -> str:
        return f"hf-classifier[{self.model_id}:{self.labels[self.label_index]}:{self.activation}]"

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        probs = classify(self.model, self.tok, texts, batch_size, self.max_length, self.activation)
        return {n: probs[:, i] for i, n in enumerate(self.labels)}


# --- Detoxify ----------------------------------------------------------------------------------------

DETOXIFY_URLS = {  # the checkpoints the detoxify package downloads (its MODEL_URLS)
    "original": "https://github.com/unitaryai/detoxify/releases/download/v0.1-alpha/toxic_original-c1212f89.ckpt",
    "unbiased": "https://github.com/unitaryai/detoxify/releases/download/v0.3-alpha/toxic_debiased-c7548aa0.ckpt",
    "multilingual": "https://github.com/unitaryai/detoxify/releases/download/v0.4-alpha/"
                    "multilingual_debiased-0b549669.ckpt",
    "original-small": "https://github.com/unitaryai/detoxify/releases/download/v0.1.2/original-albert-0e1d6498.ckpt",
    "unbiased-small": "https://github.com/unitaryai/detoxify/releases/download/v0.1.2/unbiased-albert-c8519128.ckpt",
}
# Detoxify renames the Jigsaw classes so that every checkpoint says "toxicity" for the main one
DETOXIFY_RENAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


def _torch_hub_checkpoint(model_type: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / DETOXIFY_URLS[model_type].rsplit("/", 1)[1]


def read_detoxify_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, list[str]]:
    """Read a Detoxify ``.ckpt``: a torch-saved dict ``{"config": {"arch": {"args": {model_type,
    model_name, tokenizer_name, num_classes}}, "dataset": {"args": {"classes": [...]}}}, "state_dict":
    {transformers parameter name: tensor}}``. Loaded with ``weights_only=True``, so it cannot run code.
    Returns (arch args, state dict, class names after Detoxify's renaming)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ScorerError(f"Detoxify checkpoint {path} does not exist") from e
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or others for bad files
        raise ScorerError(f"cannot read Detoxify checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ScorerError(f"{path} is not a Detoxify checkpoint: it needs the keys 'config' and 'state_dict'")
    try:
        args = dict(ckpt["config"]["arch"]["args"])
        classes = list(ckpt["config"]["dataset"]["args"]["classes"])
    except (KeyError, TypeError) as e:
        raise ScorerError(f"{path}: config lacks arch.args or dataset.args.classes ({e})") from e
    missing = {"model_type", "model_name", "num_classes"} - set(args)
    if missing:
        raise ScorerError(f"{path}: config.arch.args lacks {sorted(missing)}")
    if len(classes) != int(args["num_classes"]):
        raise ScorerError(f"{path}: {len(classes)} class names for num_classes={args['num_classes']}")
    return args, ckpt["state_dict"], [DETOXIFY_RENAMES.get(c, c) for c in classes]


def _fix_key(k: str) -> str:
    """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
    if k.endswith("LayerNorm.gamma"):
        return k[: -len("gamma")] + "weight"
    if k.endswith("LayerNorm.beta"):
        return k[: -len("beta")] + "bias"
    return k


class DetoxifyScorer(Scorer):
    """A Detoxify model (Hanu & Unitary, 2020) from its checkpoint file, run through transformers.

    ``checkpoint`` is the ``.ckpt`` file; without it, the torch hub cache is searched for the file of
    ``model_type`` (where the detoxify package puts it), and ``download=True`` fetches it when online.
    The checkpoint names a hub architecture (e.g. ``bert-base-uncased``) whose config and tokenizer are
    needed too: ``config_path`` is a local directory holding them (``config.json`` and the tokenizer
    files), as detoxify's ``huggingface_config_path``; without it they come from the hub or its cache.
    Scores are a sigmoid per class, as in ``Detoxify.predict``; attributes put ``toxicity`` first.
    """

    name = "detoxify"
    batch_size = 32

    def __init__(self, checkpoint: str | os.PathLike | None = None, model_type: str = "original",
                 config_path: str | os.PathLike | None = None, download: bool = False, device: str = "cpu",
                 max_length: int | None = None) -> None:
        choose("Detoxify model_type", model_type, sorted(DETOXIFY_URLS), ScorerError)
        if checkpoint is None:
            checkpoint = self._find_checkpoint(model_type, download)
        self.checkpoint = str(checkpoint)
        args, state, self.labels = read_detoxify_checkpoint(checkpoint)
        model, self.tok = self._build(args, state, config_path)
        self.model = model.to(device)
        _prepare(self.model, self.tok)
        self.max_length = _max_length(self.tok, self.model.config, max_length)
        main = self.labels.index("toxicity") if "toxicity" in self.labels else 0
        self.attributes = [self.labels[main]] + [n for i, n in enumerate(self.labels) if i != main]

    @staticmethod
    def _find_checkpoint(model_type: str, download: bool) -> Path:
        cached = _torch_hub_checkpoint(model_type)
        if cached.exists():
            return cached
        url = DETOXIFY_URLS[model_type]
        if not download:
            raise ScorerError(
                f"scorer 'detoxify' needs a checkpoint and none was given (none cached at {cached}): download "
                f"{url} and pass checkpoint='/path/to/{cached.name}', or pass download=True when online "
                "(config_path=DIR with the base model's config and tokenizer files makes loading fully offline)")
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except OSError as e:
            raise ScorerError(f"could not download the Detoxify checkpoint {url}: {e}; "
                              "pass checkpoint=PATH to a local copy") from e
        return cached

    @staticmethod
    def _build(args: dict, state: dict, config_path: str | os.PathLike | None):
        import transformers

        model_name = str(args["model_name"])
        model_class = getattr(transformers, model_name, None)
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
                and model_name.endswith("ForSequenceClassification")):
            raise ScorerError(f"Detoxify checkpoint names model class {model_name!r}, "
                              "not a transformers *ForSequenceClassification class")
        source = str(config_path) if config_path is not None else str(args["model_type"])
        tok_name = str(args.get("tokenizer_name", "AutoTokenizer"))
        tok_class = getattr(transformers, tok_name, None)
        if not (isinstance(tok_class, type) and hasattr(tok_class, "from_pretrained") and "Tokenizer" in tok_name):
            tok_class = transformers.AutoTokenizer
        try:
            config = transformers.AutoConfig.from_pretrained(source)
            tok = tok_class.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ScorerError(
                f"Detoxify needs the config and tokenizer of {args['model_type']!r} and could not load them "
                f"from {source!r}: pass config_path=DIR holding that model's config.json and tokenizer files "
                f"({e})") from e
        config.num_labels = int(args["num_classes"])
        config.problem_type = "multi_label_classification"
        model = model_class(config)
        state = {_fix_key(k): v for k, v in state.items()}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ScorerError(f"the Detoxify state dict does not fit {model_name} built from {source!r}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model, tok

    @property
    def key(self) -> str:
        p = Path(self.checkpoint)
        return f"detoxify[{p.name}:{p.stat().st_size}]"

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        probs = classify(self.model, self.tok, texts, batch_size, self.max_length, "sigmoid")
        return {n: probs[:, i] for i, n in enumerate(self.labels)}
