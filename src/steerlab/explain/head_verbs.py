"""Instruction verbs in attention-head word pairs, base vs tuned (Wu et al., METHODS.md 2).

The paper's statistic: per layer group and per verb, the share of heads in which the tuned model's
word pairs contain the verb more often than the base model's (heads where the two counts are equal
are left out; a verb with no such head is dropped), then a two-sided Welch t-test of those shares,
instruction verbs against a background list of about 3000 frequent verbs. Heads are matched by
``(layer, head)`` when the two models have the same numbers of layers and heads (the paper's
setting); otherwise every (tuned head, base head) pair of the layer group is compared, so the share
becomes the probability that a tuned head has more occurrences than a base head, ties left out.

A head's count of a verb is its number of occurrences (as key or query) in the head's pair list.
The vocabulary the heads are read with must contain every verb tested (:func:`head_vocabulary`),
or a missing verb counts 0 in both models and says nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import EmptyInputError

INSTRUCTION_VERBS = ("write", "give", "find", "create", "make", "describe", "design", "generate", "classify",
                     "have", "explain", "tell", "identify", "output", "predict", "detect", "translate",
                     "summarize", "retrieve", "revise", "evaluate", "correct", "develop", "analyze", "compose",
                     "demonstrate", "interpret", "solve", "follow", "clarify", "say", "help", "act", "recommend",
                     "estimate", "edit", "format", "repeat", "list", "answer", "rewrite", "suggest", "compare",
                     "choose", "provide", "name")
"""The verbs of the paper's analysis (its two instruction-verb lists) and eight further imperative
verbs of steerlab's example set (list, answer, rewrite, suggest, compare, choose, provide, name)."""

VERBS_FILE = Path(__file__).resolve().parent.parent / "data" / "files" / "verbs_en.txt"
N_GROUPS = 4


@cache
def _verb_file() -> tuple[str, ...]:
    lines = VERBS_FILE.read_text(encoding="utf8").splitlines()
    return tuple(w.strip() for w in lines if w.strip() and not w.startswith("#"))


def background_verbs(n: int = 3000, exclude: Sequence[str] = INSTRUCTION_VERBS) -> list[str]:
    """The ``n`` most frequent English verbs of the bundled list (``data/files/verbs_en.txt``, how it
    was built is in its header), ``exclude`` left out."""
    out = set(exclude)
    return [v for v in _verb_file() if v not in out][:n]


def head_vocabulary(n_words: int, verbs: Sequence[str]) -> list[str]:
    """The ``n_words`` most frequent English words, then every verb of ``verbs`` not among them (so
    the frequency order of the first words, which the similarity thresholds use, is kept)."""
    from .heads import english_words

    words = english_words(n_words)
    seen = set(words)
    return words + [v for v in dict.fromkeys(verbs) if v not in seen]


def layer_group(layer: int, n_layers: int, n_groups: int = N_GROUPS) -> str:
    """The relative-depth group of a layer, as ``"lo-hi%"``."""
    g = min(n_groups - 1, layer * n_groups // n_layers)
    return f"{100 * g // n_groups}-{100 * (g + 1) // n_groups}%"


def head_counts(heads) -> dict[tuple[int, int], Counter]:
    """``(layer, head) -> Counter`` of the words (lower-cased) in each head's pairs, as key or query."""
    return {(hp.layer, h): Counter(w.lower() for k, q, _, _ in pairs for w in (k, q))
            for hp in heads for h, pairs in enumerate(hp.pairs)}


def _groups(counts: dict, n_layers: int, n_groups: int) -> dict[str, list]:
    by: dict[str, list] = {}
    for (layer, h), c in sorted(counts.items()):
        by.setdefault(layer_group(layer, n_layers, n_groups), []).append(((layer, h), c))
    return by


def _share(t_counts: list[int], b_counts: list[int], matched: bool) -> tuple[float, int]:
    """Share of comparisons where tuned > base, ties left out, and the number of untied comparisons."""
    t, b = np.asarray(t_counts), np.asarray(b_counts)
    if matched:
        gt, lt = int((t > b).sum()), int((t < b).sum())
    else:
        gt, lt = int((t[:, None] > b[None]).sum()), int((t[:, None] < b[None]).sum())
    return (gt / (gt + lt), gt + lt) if gt + lt else (float("nan"), 0)


def verb_shares(base_heads, tuned_heads, base_layers: int, tuned_layers: int, instruction: Sequence[str],
                background: Sequence[str], n_groups: int = N_GROUPS) -> tuple[list[dict], bool]:
    """Per layer group and verb: the share of heads where the tuned count exceeds the base count.
    Returns the rows and whether heads were matched one to one."""
    b, t = head_counts(base_heads), head_counts(tuned_heads)
    matched = base_layers == tuned_layers and set(b) == set(t)
    bg, tg = _groups(b, base_layers, n_groups), _groups(t, tuned_layers, n_groups)
    rows = []
    for g in sorted(set(bg) & set(tg), key=lambda s: int(s.split("-")[0])):
        for kind, verbs in (("instruction", instruction), ("background", background)):
            for v in verbs:
                share, n = _share([c[v] for _, c in tg[g]], [c[v] for _, c in bg[g]], matched)
                if n:
                    rows.append({"layer_group": g, "verb": v, "kind": kind, "share_tuned_gt_base": share,
                                 "n_untied": n, "tuned_total": sum(c[v] for _, c in tg[g]),
                                 "base_total": sum(c[v] for _, c in bg[g])})
    return rows, matched


def verb_tests(rows: Sequence[dict]) -> dict[str, dict]:
    """Per layer group: two-sided Welch t-test of the instruction verbs' shares against the
    background verbs' (an ``error`` entry where a group has fewer than 2 verbs of a kind)."""
    from scipy import stats

    out = {}
    for g in dict.fromkeys(r["layer_group"] for r in rows):
        a = [r["share_tuned_gt_base"] for r in rows if r["layer_group"] == g and r["kind"] == "instruction"]
        b = [r["share_tuned_gt_base"] for r in rows if r["layer_group"] == g and r["kind"] == "background"]
        if len(a) < 2 or len(b) < 2:
            out[g] = {"error": f"layer group {g}: {len(a)} instruction and {len(b)} background verbs occur in some "
                               f"head of one model but not equally in the other; a test needs 2 of each"}
            continue
        t, p = stats.ttest_ind(a, b, equal_var=False)
        out[g] = {"group_a": "instruction verbs", "group_b": "background verbs", "n_a": len(a), "n_b": len(b),
                  "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)), "t": float(t), "p_two_sided": float(p)}
    if not out:
        raise EmptyInputError("no verb occurs differently in the two models' head pairs: nothing to test")
    return out
