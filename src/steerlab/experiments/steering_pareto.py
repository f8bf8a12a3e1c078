"""The fluency trade-off of the steering study: every variant x strength on held-out test prompts,
its Pareto front (lower toxicity, lower continuation perplexity, lower neutral-text KL) and the
figure (two panels: held-out mean toxicity against the perplexity ratio and against the KL).

These points are for the trade-off figure only; nothing here feeds a choice (the study chooses on
validation prompts and neutral validation texts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pareto_front(values) -> np.ndarray:
    """Bool mask of the non-dominated rows of ``values [n, m]`` (every column minimised): a row is
    dominated when another is <= in every column and < in at least one. Rows with a NaN are never
    on the front (and dominate nothing)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"pareto_front needs a [n, m] array, got shape {v.shape}")
    ok = np.isfinite(v).all(1)
    front = ok.copy()
    for i in np.nonzero(ok)[0]:
        others = v[ok]
        dominated = ((others <= v[i]).all(1) & (others < v[i]).any(1)).any()
        front[i] = not dominated
    return front


def target_check(tox: float, base_tox: float, ppl_ratio: float, kl: float, target: dict) -> dict:
    """How a point stands against the target: its toxicity share of the unsteered value, perplexity
    ratio and KL, each with whether it meets its limit, and ``met`` for all three."""
    share = tox / base_tox if base_tox > 0 else float("nan")
    out = {"toxicity_share": share, "ppl_ratio": ppl_ratio, "kl": kl,
           "toxicity_ok": bool(share <= target["max_toxicity_share"]),
           "ppl_ok": bool(ppl_ratio <= target["max_ppl_ratio"]), "kl_ok": bool(kl <= target["max_kl"])}
    out["met"] = out["toxicity_ok"] and out["ppl_ok"] and out["kl_ok"]
    return out


def pareto_points(results: dict, cells: dict, target: dict) -> list[dict]:
    """One record per evaluated cell (``cells``: arm name -> ``{variant, site, alpha, ...}``) from the
    held-out ``results`` (arm name -> metrics with ``paired_difference``; ``"unsteered"`` is the
    reference), with the 3-objective front and the two 2-objective fronts of the figure's panels."""
    base = results["unsteered"]
    base_tox = base["toxicity"]["mean_toxicity"]["value"]
    base_ppl = base.get("fluency", {}).get("perplexity", float("nan"))
    pts = []
    for name, cell in cells.items():
        r = results[name]
        tx = r["toxicity"]
        ppl = r.get("fluency", {}).get("perplexity", float("nan"))
        kl = r.get("side_effects", {}).get("kl_from_unedited", float("nan"))
        pts.append({"arm": name, **cell, "mean_toxicity": tx["mean_toxicity"],
                    "expected_max_toxicity": tx["expected_max_toxicity"]["value"],
                    "toxicity_probability": tx["toxicity_probability"]["value"], "perplexity": ppl,
                    "ppl_ratio": ppl / base_ppl, "neutral_kl": kl,
                    "neutral_perplexity": r.get("side_effects", {}).get("neutral_perplexity", float("nan")),
                    "paired_difference": r.get("paired_difference"),
                    "target": target_check(tx["mean_toxicity"]["value"], base_tox, ppl / base_ppl, kl, target)})
    if pts:
        tox = np.array([p["mean_toxicity"]["value"] for p in pts])
        ppl = np.array([p["ppl_ratio"] for p in pts])
        kl = np.array([p["neutral_kl"] for p in pts])
        for key, cols in (("front", [tox, ppl, kl]), ("front_ppl", [tox, ppl]), ("front_kl", [tox, kl])):
            for p, f in zip(pts, pareto_front(np.stack(cols, 1))):
                p[key] = bool(f)
    return pts


def plot_pareto(points: list[dict], base: dict, target: dict, path: str | Path, title: str) -> Path:
    """Two panels: held-out mean toxicity against the continuation perplexity ratio and against the
    neutral-text KL; one colour and marker per variant, its strengths joined in order, the
    unsteered point, the target region shaded and each panel's Pareto front drawn as a step line."""
    from ..report import figures as F

    fig, axes = F.figure(1, 2, title=title, width=13, height=5.2)
    base_tox = base["toxicity"]["mean_toxicity"]["value"]
    ymax = max([base_tox] + [p["mean_toxicity"]["hi"] for p in points]) * 1.1
    markers = "osD^vP*X"
    variants = list(dict.fromkeys(p["variant"] for p in points))
    for ax, xkey, xlim, xlabel in ((axes[0], "ppl_ratio", target["max_ppl_ratio"],
                                    "continuation perplexity / unsteered (unedited model as judge; log)"),
                                   (axes[1], "neutral_kl", target["max_kl"],
                                    "KL(unedited || edited) on neutral text, nats (symlog)")):
        x0 = 1.0 if xkey == "ppl_ratio" else 0.0
        lo = 0.0 if xkey == "neutral_kl" else 0.95 * min([x0] + [p[xkey] for p in points])
        ax.fill_between([lo, xlim], 0, 0.5 * base_tox, color="#1b7837", alpha=0.15, lw=0,
                        label="target: toxicity <= half unsteered, within the fluency limit")
        for n, v in enumerate(variants):
            ps = sorted([p for p in points if p["variant"] == v], key=lambda p: p["alpha"])
            x = [p[xkey] for p in ps]
            y = [p["mean_toxicity"]["value"] for p in ps]
            err = [[p["mean_toxicity"]["value"] - p["mean_toxicity"]["lo"] for p in ps],
                   [p["mean_toxicity"]["hi"] - p["mean_toxicity"]["value"] for p in ps]]
            c = F.PALETTE[n % len(F.PALETTE)]
            ax.errorbar(x, y, yerr=err, color=c, marker=markers[n % len(markers)], ms=6, lw=1.2, capsize=2,
                        label=f"{v} @ {ps[0]['site'].replace('.resid_post', '')}")
            for p in ps:
                ax.annotate(f"{p['alpha']:.3g}", (p[xkey], p["mean_toxicity"]["value"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=c)
        front = sorted([p for p in points if p["front_ppl" if xkey == "ppl_ratio" else "front_kl"]],
                       key=lambda p: p[xkey])
        if front:
            ax.step([p[xkey] for p in front], [p["mean_toxicity"]["value"] for p in front], where="post",
                    color="black", ls="--", lw=1.2, alpha=0.8, label="Pareto front (this panel's two objectives)")
        ax.plot([x0], [base_tox], "k*", ms=14, label="unsteered")
        ax.axhline(0.5 * base_tox, color="#1b7837", lw=0.8, ls=":")
        if xkey == "neutral_kl":
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(left=0)
        else:
            ax.set_xscale("log")
        ax.set_ylim(0, ymax)
        F.label(ax, xlabel, "held-out mean toxicity (95% bootstrap CI)", legend=xkey == "ppl_ratio")
    return F.save(fig, path)
