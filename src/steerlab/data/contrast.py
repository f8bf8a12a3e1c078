"""Contrast sets: desirable and undesirable texts (optionally paired) to fit steering vectors, probes
and other contrastive interventions on, with a content fingerprint and a JSON save format.

Builders:

- :func:`contrast_from_scores`: scored prompts, the most toxic ones sorted by decreasing toxicity
  paired with the least toxic ones sorted by increasing toxicity (the steering-vector contrast
  sets of METHODS.md section 1);
- :func:`contrast_from_continuations`: the model's own continuations, split by a score threshold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, EmptyInputError, ShapeError
from .prompts import Prompt

FORMAT = "steerlab.contrast"
VERSION = 1


@dataclass
class ContrastSet:
    """Desirable (e.g. non-toxic) and undesirable (e.g. toxic) texts.

    ``paired=True`` means ``desirable[i]`` and ``undesirable[i]`` form pair ``i`` (equal lengths);
    otherwise the two lists are independent samples. ``source`` says in words where the texts came
    from; scores (when known) align with the texts; ``metadata`` holds builder settings.
    """

    desirable: list[str]
    undesirable: list[str]
    paired: bool = False
    source: str = ""
    desirable_scores: list[float] | None = None
    undesirable_scores: list[float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.desirable, self.undesirable = list(self.desirable), list(self.undesirable)
        if not self.desirable or not self.undesirable:
            raise EmptyInputError(f"a contrast set needs texts on both sides, got {len(self.desirable)} "
                                  f"desirable and {len(self.undesirable)} undesirable")
        for side in (self.desirable, self.undesirable):
            bad = next((t for t in side if not isinstance(t, str)), None)
            if bad is not None:
                raise DataError(f"contrast texts must be strings, got {type(bad).__name__}")
        if self.paired and len(self.desirable) != len(self.undesirable):
            raise ShapeError(f"a paired contrast set needs equal sides, got {len(self.desirable)} desirable "
                             f"and {len(self.undesirable)} undesirable texts")
        for name, sc, side in (("desirable", self.desirable_scores, self.desirable),
                               ("undesirable", self.undesirable_scores, self.undesirable)):
            if sc is not None and len(sc) != len(side):
                raise ShapeError(f"{name}_scores has {len(sc)} values for {len(side)} texts")
        if self.desirable_scores is not None:
            self.desirable_scores = [float(s) for s in self.desirable_scores]
        if self.undesirable_scores is not None:
            self.undesirable_scores = [float(s) for s in self.undesirable_scores]

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the contents that a fit depends on: both text lists, in
        order, and whether they are paired (not the scores, source or metadata)."""
        blob = json.dumps({"desirable": self.desirable, "undesirable": self.undesirable,
                           "paired": self.paired}, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def pairs(self) -> list[tuple[str, str]]:
        """``(desirable, undesirable)`` pairs of a paired set."""
        if not self.paired:
            raise DataError("this contrast set is not paired; use .desirable and .undesirable")
        return list(zip(self.desirable, self.undesirable, strict=True))

    def to_dict(self) -> dict:
        """The JSON form written by :meth:`save`."""
        return {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint,
                "source": self.source, "paired": self.paired,
                "desirable": self.desirable, "undesirable": self.undesirable,
                "desirable_scores": self.desirable_scores, "undesirable_scores": self.undesirable_scores,
                "metadata": self.metadata}

    def save(self, path: str | Path) -> Path:
        """Write the set as one JSON file (UTF-8); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ContrastSet:
        """Read a set written by :meth:`save`; the stored fingerprint must match the contents."""
        from ..runs import read_json

        path = Path(path)
        d = read_json(path, "contrast set file", DataError)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise DataError(f"{path} is not a steerlab contrast set (no \"format\": \"{FORMAT}\")")
        if d.get("version", 0) > VERSION:
            raise DataError(f"{path} has contrast-set format version {d['version']}; this steerlab reads "
                            f"up to {VERSION}")
        missing = [k for k in ("desirable", "undesirable") if k not in d]
        if missing:
            raise DataError(f"{path}: missing field(s) {missing}")
        cs = cls(d["desirable"], d["undesirable"], bool(d.get("paired", False)), d.get("source", ""),
                 d.get("desirable_scores"), d.get("undesirable_scores"), d.get("metadata") or {})
        if d.get("fingerprint") not in (None, cs.fingerprint):
            raise DataError(f"{path}: stored fingerprint {d['fingerprint']} does not match the contents "
                            f"({cs.fingerprint}); the file was edited or damaged")
        return cs


def _texts_ids(items: Sequence[Prompt | str]) -> tuple[list[str], list[str | None]]:
    return ([p.text if isinstance(p, Prompt) else p for p in items],
            [p.id if isinstance(p, Prompt) else None for p in items])


def _scores(scores, shape: tuple[int, ...], what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != shape:
        raise ShapeError(f"{what}: scores have shape {s.shape}, expected {shape}")
    if np.isnan(s).any():
        raise DataError(f"{what}: scores contain NaN")
    return s


def contrast_from_scores(
    texts: Sequence[Prompt | str],
    scores: Sequence[float] | np.ndarray,
    n: int | None = None,
    threshold: float | None = None,
    source: str = "",
) -> ContrastSet:
    """Pair the ``n`` most toxic texts, sorted by decreasing score, with the ``n`` least toxic,
    sorted by increasing score: pair ``i`` is (``i``-th least toxic, ``i``-th most toxic).

    Without ``threshold`` the two ends of the ranking are used (``n`` defaults to half the texts,
    and ``2n`` may not exceed their number); with it, undesirable texts must score
    ``>= threshold`` and desirable ones ``< threshold`` (``n`` defaults to the smaller pool).
    Ties are broken by input order. ``scores`` are higher-is-worse (toxicity probabilities).
    """
    txt, ids = _texts_ids(texts)
    s = _scores(scores, (len(txt),), "contrast_from_scores")
    if not txt:
        raise EmptyInputError("contrast_from_scores got no texts")
    up = np.argsort(s, kind="stable")                # increasing score, ties in input order
    down = np.argsort(-s, kind="stable")             # decreasing score, ties in input order
    if threshold is None:
        avail_d = avail_u = len(txt) // 2
    else:
        up, down = up[s[up] < threshold], down[s[down] >= threshold]
        avail_d, avail_u = len(up), len(down)
    n_max = min(avail_d, avail_u)
    n = n_max if n is None else int(n)
    if n < 1 or n > n_max:
        if threshold is None:
            why = f"{len(txt)} texts allow at most {n_max} disjoint pairs"
        else:
            why = f"{avail_u} texts score >= {threshold} and {avail_d} score below it"
        raise DataError(f"contrast_from_scores: cannot build n={n} pairs: {why}")
    d_idx, u_idx = up[:n], down[:n]
    return ContrastSet(
        [txt[i] for i in d_idx], [txt[i] for i in u_idx], paired=True,
        source=source or "contrast_from_scores",
        desirable_scores=s[d_idx].tolist(), undesirable_scores=s[u_idx].tolist(),
        metadata={"builder": "contrast_from_scores", "n": n, "threshold": threshold,
                  "n_texts": len(txt), "desirable_ids": [ids[i] for i in d_idx],
                  "undesirable_ids": [ids[i] for i in u_idx]},
    )


def contrast_from_continuations(
    prompts: Sequence[Prompt | str],
    continuations: Sequence[str] | Sequence[Sequence[str]],
    scores: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    threshold: float = 0.5,
    include_prompt: bool = True,
    pair: bool = False,
    source: str = "",
) -> ContrastSet:
    """A contrast set from the model's own scored continuations.

    ``continuations`` and ``scores`` are ``[n_prompts]`` or ``[n_prompts][k]``. A continuation
    scoring ``>= threshold`` is undesirable, one below it desirable. Each text is the prompt
    followed directly by the continuation (``include_prompt=True``, as generated) or the
    continuation alone. Unpaired (default): all undesirable texts by decreasing score and all
    desirable ones by increasing score. ``pair=True``: for every prompt that has continuations on
    both sides, its least toxic continuation is paired with its most toxic one (same prompt, so
    the pair differs only in the continuation); prompts keep their order.
    """
    p_txt, p_ids = _texts_ids(prompts)
    if not p_txt:
        raise EmptyInputError("contrast_from_continuations got no prompts")
    if len(continuations) != len(p_txt):
        raise ShapeError(f"{len(continuations)} continuation rows for {len(p_txt)} prompts")
    conts = [[c] if isinstance(c, str) else list(c) for c in continuations]
    k = len(conts[0])
    if any(len(c) != k for c in conts):
        raise ShapeError("every prompt needs the same number of continuations")
    s = _scores(scores, (len(p_txt), k) if not isinstance(continuations[0], str) else (len(p_txt),),
                "contrast_from_continuations").reshape(len(p_txt), k)

    def text(i: int, j: int) -> str:
        return p_txt[i] + conts[i][j] if include_prompt else conts[i][j]

    meta: dict[str, Any] = {"builder": "contrast_from_continuations", "threshold": threshold,
                            "include_prompt": include_prompt, "n_prompts": len(p_txt), "k": k}
    if pair:
        d, u, ds, us, pid = [], [], [], [], []
        for i in range(len(p_txt)):
            row = s[i]
            lo, hi = int(np.argmin(row)), int(np.argmax(row))
            if row[lo] < threshold <= row[hi]:
                d.append(text(i, lo))
                u.append(text(i, hi))
                ds.append(float(row[lo]))
                us.append(float(row[hi]))
                pid.append(p_ids[i])
        if not d:
            raise DataError(f"contrast_from_continuations: no prompt has continuations both below and at or "
                            f"above threshold {threshold}; cannot pair")
        meta["prompt_ids"] = pid
        return ContrastSet(d, u, True, source or "contrast_from_continuations (paired)", ds, us, meta)
    flat = [(i, j) for i in range(len(p_txt)) for j in range(k)]
    flat_s = np.array([s[i, j] for i, j in flat])
    up = [flat[t] for t in np.argsort(flat_s, kind="stable") if flat_s[t] < threshold]
    down = [flat[t] for t in np.argsort(-flat_s, kind="stable") if flat_s[t] >= threshold]
    if not up or not down:
        raise DataError(f"contrast_from_continuations: {len(down)} continuations score >= {threshold} and "
                        f"{len(up)} below it; both sides need at least one")
    meta["desirable_prompt_ids"] = [p_ids[i] for i, _ in up]
    meta["undesirable_prompt_ids"] = [p_ids[i] for i, _ in down]
    return ContrastSet([text(i, j) for i, j in up], [text(i, j) for i, j in down], False,
                       source or "contrast_from_continuations",
                       [float(s[i, j]) for i, j in up], [float(s[i, j]) for i, j in down], meta)
