"""Figures and the HTML page of an instruction-shift comparison (base vs tuned model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..report import figures as F
from ..report.html import HtmlReport


def _ax(axes):
    return np.atleast_1d(axes).ravel()[0]


def verbs_figure(path: Path, verbs: Sequence[dict]) -> Path:
    """Mean share of heads where the tuned model has more occurrences than the base, per layer group
    and verb kind (0.5: no shift)."""
    groups = list(dict.fromkeys(r["layer_group"] for r in verbs))

    def mean(g, kind):
        xs = [r["share_tuned_gt_base"] for r in verbs if r["layer_group"] == g and r["kind"] == kind]
        return float(np.mean(xs)) if xs else float("nan")

    series = {kind: [mean(g, kind) for g in groups] for kind in ("instruction", "background")}
    fig, axes = F.figure(title="Verbs in head word pairs: share of heads with tuned > base")
    ax = _ax(axes)
    F.bars(ax, groups, {f"{k} verbs": v for k, v in series.items()})
    F.label(ax, "layer group (relative depth)", "mean share of heads, tuned count > base count")
    return F.save(fig, path)


def scores_figure(path: Path, scores: Sequence[dict]) -> Path:
    """Instruction score per item under each model (followed / unfollowed marked when known)."""
    fig, axes = F.figure(title="Instruction score S per item")
    ax = _ax(axes)
    ids = list(dict.fromkeys(r["id"] for r in scores))
    x = np.arange(len(ids))
    for j, role in enumerate(("base", "tuned")):
        by = {r["id"]: r for r in scores if r["model"] == role}
        y = [by[i]["score"] if i in by else np.nan for i in ids]
        ax.bar(x + (j - 0.5) * 0.4, y, 0.4, label=role, color=F.PALETTE[j + 1])
    ax.set_xticks(x, ids, rotation=90, fontsize=7)
    F.label(ax, "item", "instruction score S")
    return F.save(fig, path)


def overlap_figure(path: Path, overlap: Sequence[dict]) -> Path:
    fig, axes = F.figure(title="FFN top words shared by the two models (Jaccard)")
    ax = _ax(axes)
    F.bars(ax, [r["layer_group"] for r in overlap], {"Jaccard overlap": [r["jaccard"] for r in overlap]})
    F.label(ax, "layer group (relative depth)", "Jaccard overlap of top-word sets")
    return F.save(fig, path)


def _test_rows(tests: dict) -> list[dict]:
    rows = []
    for name, t in tests.items():
        if "error" in t:
            rows.append({"test": name, "note": t["error"]})
        else:
            p = ("p (one-sided)", t["p_one_sided"]) if "p_one_sided" in t else ("p (two-sided)", t["p_two_sided"])
            rows.append({"test": name, **{k: t[k] for k in ("group_a", "group_b", "n_a", "n_b", "mean_a", "mean_b",
                                                             "t")}, "p": p[1], "sidedness": p[0]})
    return rows


def write_report(out: Path, summary: dict, verbs, concepts, overlap, scores) -> Path:
    figs = out / "figures"
    page = HtmlReport("Instruction-tuning shift", f"base: {summary['base']}   tuned: {summary['tuned']}", base_dir=out)
    if not summary["same_family"]:
        page.paragraph("The two models differ in architecture or tokenizer: they are compared through words and "
                       "scores only (layers by relative depth). Differences mix the effect of instruction tuning "
                       "with everything else that differs between the models (data, size, tokenizer).", note=True)
    page.heading("Tests (Welch t-tests: attribution one-sided, head verbs two-sided per layer group)")
    page.table(_test_rows(summary["tests"]))
    page.heading("Attribution: instruction scores")
    page.figure(scores_figure(figs / "instruction_scores.png", scores), "Instruction score per item and model")
    page.table_csv(out / "tables" / "instruction_scores.csv", max_rows=60)
    page.heading("Attention heads: instruction verbs in the word pairs")
    page.figure(verbs_figure(figs / "head_verbs.png", verbs), "Share of heads with tuned count > base count")
    page.table_csv(out / "tables" / "head_verbs.csv", max_rows=60)
    page.heading("FFN components")
    if concepts:
        page.table_csv(out / "tables" / "ffn_concepts.csv", caption="Share of components per label and layer group")
    else:
        page.paragraph("No labeller given: the top-word overlap of the two models per layer group instead.", note=True)
        page.figure(overlap_figure(figs / "ffn_overlap.png", overlap), "Jaccard overlap of FFN top words")
        page.table_csv(out / "tables" / "ffn_overlap.csv")
    page.table_csv(out / "tables" / "ffn_components.csv", max_rows=40)
    page.heading("Timings (seconds)").table([{"model": k, **v} for k, v in summary["seconds"].items()])
    return page.write(out / "report.html")
