"""Token-toxicity lexicon: a toxicity score for every word-like token of a model's vocabulary.

A token is *word-like* when its text, decoded on its own (so the leading-space marker of byte-level
BPE ``Ġ`` or SentencePiece ``▁`` becomes a space) and stripped of surrounding whitespace, is made of
ASCII letters only and has at least ``min_len`` (2) of them. Word-initial tokens (" fuck") and
word-internal pieces ("uck") both count; special tokens, digits, punctuation, byte fragments and
non-Latin scripts do not. Each distinct word is scored once, inside the carrier sentence
(``"This is {}."`` by default, so that sentence-level classifiers see a sentence), with the scorer's
main attribute; tokens that decode to the same word share its score.

Lexicons are cached per (model fingerprint, scorer key, carrier, rule) under
``steerlab.models.cache_dir() / "lexicons"`` as ``.npz`` files, written to a temporary file and renamed
into place so that an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

import numpy as np

from ..models.loading import cache_dir
from .registry import Scorer, ScorerError, get_scorer

_RULE_VERSION = 1


def word_tokens(tok, n: int, min_len: int = 2) -> tuple[np.ndarray, list[str]]:
    """Ids (ascending) and stripped texts of the word-like tokens among ids ``0 .. n-1`` of ``tok``."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    texts = tok.batch_decode([[i] for i in range(n)])
    ids, words = [], []
    for i, t in enumerate(texts):
        w = t.strip()
        if i not in special and len(w) >= min_len and w.isascii() and w.isalpha():
            ids.append(i)
            words.append(w)
    return np.asarray(ids, dtype=np.int64), words


def _spec(model, scorer: Scorer, carrier: str, min_len: int) -> dict:
    return {"model": model.fingerprint, "scorer": scorer.key, "carrier": carrier, "min_len": min_len,
            "rule": _RULE_VERSION}


def lexicon_path(model, scorer: Scorer, carrier: str = "This is {}.", min_len: int = 2) -> Path:
    """Where the lexicon of ``model`` under ``scorer`` (and this carrier and rule) is cached."""
    spec = json.dumps(_spec(model, scorer, carrier, min_len), sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", scorer.name)[:40]
    return cache_dir() / "lexicons" / f"{model.fingerprint}-{slug}-{digest}.npz"


def _read(path: Path, spec: dict) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) != spec:
                return None
            return z["token_ids"].astype(np.int64), z["scores"].astype(np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # missing or damaged: recompute


def _write(path: Path, ids: np.ndarray, scores: np.ndarray, spec: dict) -> None:
    from ..runs import write_atomic

    write_atomic(path, lambda fh: np.savez(fh, token_ids=ids, scores=scores,
                                           meta=np.asarray(json.dumps(spec, sort_keys=True))))


def token_lexicon(model, scorer: str | Scorer = "default", carrier: str = "This is {}.", cache: bool = True,
                  min_len: int = 2, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Toxicity of each word-like token of ``model``'s vocabulary: ``(token_ids, scores)``, ids ascending,
    scores in [0, 1] = the scorer's main attribute on ``carrier.format(word)``.

    ``model`` is a :class:`steerlab.Model` (anything with ``tok``, ``fingerprint`` and ``vocab_size``);
    ids run up to the smaller of the tokenizer's size and the unembedding's rows. With ``cache=True``
    a lexicon computed before for the same model, scorer, carrier and rule is read back, not rescored.
    """
    for attr in ("tok", "fingerprint", "vocab_size"):
        if not hasattr(model, attr):
            raise ScorerError(f"token_lexicon needs a steerlab Model (with .{attr}), got {type(model).__name__}")
    if not isinstance(carrier, str) or carrier.count("{}") != 1:
        raise ScorerError(f"carrier must be a string with exactly one '{{}}' for the word, got {carrier!r}")
    if min_len < 1:
        raise ScorerError(f"min_len must be at least 1, got {min_len}")
    s = get_scorer(scorer)
    spec = _spec(model, s, carrier, min_len)
    path = lexicon_path(model, s, carrier, min_len)
    if cache and (hit := _read(path, spec)) is not None:
        return hit
    n = min(len(model.tok), int(model.vocab_size))
    ids, words = word_tokens(model.tok, n, min_len)
    if len(ids) == 0:
        raise ScorerError(f"{getattr(model, 'name', 'model')}: no word-like tokens among its {n} tokens")
    unique = sorted(set(words))
    where = {w: k for k, w in enumerate(unique)}
    unique_scores = s.toxicity([carrier.format(w) for w in unique], batch_size)
    scores = unique_scores[[where[w] for w in words]]
    if cache:
        _write(path, ids, scores, spec)
    return ids, scores
