"""Analyses and views of input-output attribution (METHODS.md 2, Tables 1 and 2 of Wu et al.).

- :func:`load_annotated`: the annotated JSONL format (see ``docs/instruction_shift.md``), or the
  bundled example set ``"example"`` (``data/files/instruction_following.jsonl``, 20 items);
- :func:`score_items`: the instruction score ``S`` of every item under one model;
- :func:`followed_vs_unfollowed` and :func:`base_vs_tuned`: one-sided Welch t-tests (scipy);
- :func:`prompt_html` (the prompt's tokens shaded by importance density) and :func:`heatmap`
  (response token x prompt token PNG).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.prompts import jsonl_rows
from ..errors import DataError, EmptyInputError
from ..models.model import Model
from .attribution import B_DEFAULT, Attribution, attribute, normalise

EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "files" / "instruction_following.jsonl"


def load_annotated(spec: str | Path) -> list[dict]:
    """Items ``{"prompt", "instruction", "response"?, "followed"?, "id"?}`` from a JSONL file, or the
    bundled example set for ``"example"``. ``instruction`` must be a substring of ``prompt``."""
    path = EXAMPLE if str(spec) == "example" else Path(spec)
    if not path.is_file():
        raise DataError(f"annotated file {str(path)!r} not found (give a JSONL path or 'example')")
    items = []
    for n, row in jsonl_rows(path):
        if not row.get("prompt") or not row.get("instruction"):
            raise DataError(f"{path}, line {n}: each line needs non-empty 'prompt' and 'instruction' fields")
        if row["instruction"] not in row["prompt"]:
            raise DataError(f"{path}, line {n}: instruction {row['instruction']!r} is not a substring of the prompt")
        if "followed" in row and not isinstance(row["followed"], bool):
            raise DataError(f"{path}, line {n}: 'followed' must be true or false, got {row['followed']!r}")
        items.append({"id": str(row.get("id", n)), **row})
    if not items:
        raise EmptyInputError(f"annotated file {path} has no items")
    return items


def score_items(model: Model, items: Sequence[dict], generate: bool = False, b: int = B_DEFAULT,
                max_new_tokens: int = 32, chunk: int = 16, chat: bool | None = None) -> list[dict]:
    """One row per item: id, followed, the response used, its length, the instruction score (the
    paper's, with the per-prompt maximum of the density) and, for comparison only,
    ``score_without_prompt_max`` (the raw density, which grows with the response's length).
    ``generate=True`` ignores the given responses and lets the model answer greedily; ``chat`` as in
    :func:`~steerlab.explain.attribution.attribute` (``None``: the chat template when there is one)."""
    rows = []
    for it in items:
        resp = None if generate else it.get("response")
        att = attribute(model, it["prompt"], resp, chat=chat, max_new_tokens=max_new_tokens, chunk=chunk)
        score = att.instruction_score(it["instruction"], b)
        raw = att.instruction_score(it["instruction"], b, prompt_max=False)
        rows.append({"id": it["id"], "followed": it.get("followed"), "model": model.name,
                     "response": att.response, "n_prompt": len(att.prompt_tokens),
                     "n_response": len(att.response_tokens),
                     "score": score, "score_without_prompt_max": raw})
    return rows


def welch(a: Sequence[float], b: Sequence[float], label_a: str, label_b: str) -> dict:
    """One-sided Welch t-test that mean(a) > mean(b)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise EmptyInputError(f"a Welch t-test needs at least 2 values per group, got {a.size} ({label_a}) "
                              f"and {b.size} ({label_b})")
    t, p = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    return {"group_a": label_a, "group_b": label_b, "n_a": int(a.size), "n_b": int(b.size),
            "mean_a": float(a.mean()), "mean_b": float(b.mean()), "t": float(t), "p_one_sided": float(p)}


def followed_vs_unfollowed(rows: Sequence[dict], key: str = "score") -> dict:
    """Table 1: is the instruction score (``key``) higher when the response follows the instruction?"""
    rows = [r for r in rows if r.get("followed") is not None]
    return welch([r[key] for r in rows if r["followed"]], [r[key] for r in rows if not r["followed"]],
                 "followed", "unfollowed")


def base_vs_tuned(base_rows: Sequence[dict], tuned_rows: Sequence[dict], key: str = "score") -> dict:
    """Table 2: is the instruction score (``key``) higher under the tuned model than under the base?"""
    return welch([r[key] for r in tuned_rows], [r[key] for r in base_rows], "tuned", "base")


# --- views -------------------------------------------------------------------------------------
def prompt_html(att: Attribution, b: int = B_DEFAULT, span: str | None = None) -> str:
    """The prompt's tokens as HTML, shaded by importance density (darker: more important); the
    tokens of ``span`` are underlined."""
    d = att.density(b)
    top = d.max() if d.size and d.max() > 0 else 1.0
    marked = set(att.span_tokens(span)) if span else set()
    parts = []
    for i, piece in enumerate(att.prompt_pieces()):
        style = f"background:rgba(214,39,40,{d[i] / top:.3f})"
        if i in marked:
            style += ";text-decoration:underline"
        parts.append(f'<span title="d={d[i]:.3f}" style="{style}">{html.escape(piece)}</span>')
    return '<div style="white-space:pre-wrap;font-family:monospace;line-height:1.8">' + "".join(parts) + "</div>"


def heatmap(att: Attribution, path: str | Path, max_labels: int = 80) -> Path:
    """PNG heat map of the normalised attribution ``a~`` (rows: response tokens, columns: prompt tokens)."""
    from ..report import figures as F

    a = normalise(att.scores).T  # [n_out, n_in]
    n_out, n_in = a.shape
    fig, axes = F.figure(title="Attribution: response token x prompt token", width=min(4 + 0.18 * n_in, 24),
                         height=min(3 + 0.18 * n_out, 20))
    ax = np.atleast_1d(axes).ravel()[0]
    im = ax.imshow(a, aspect="auto", cmap="Reds", vmin=0, vmax=1)
    if n_in <= max_labels:
        ax.set_xticks(range(n_in), [repr(t)[1:-1] for t in att.prompt_pieces()], rotation=90, fontsize=7)
    if n_out <= max_labels:
        ax.set_yticks(range(n_out), [repr(t)[1:-1] for t in att.response_pieces or att.response_tokens], fontsize=7)
    fig.colorbar(im, ax=ax, label="normalised attribution max(0,a)/max")
    F.label(ax, "prompt token", "response token", legend=False)
    return F.save(fig, path)
