"""Tables, figures and ``report.html`` of the detoxification benchmark (:mod:`.bench`)."""

from __future__ import annotations

import html
import math
import re
import time
from pathlib import Path

import numpy as np

from ..errors import SteerlabError
from ..evaluation import timing_label
from ..report import figures as F
from ..report.html import HtmlReport
from ..runs import write_csv
from .bench_verdict import estimate, fmt_p


def _ci(e: dict | None, digits: int = 3) -> str:
    if not e:
        return ""
    return f"{e['value']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def table_rows(metrics: dict) -> list[dict]:
    """One row per arm: the benchmark's results table (also ``tables/results.csv``)."""
    out = []
    for a in metrics["arms"]:
        row = {"method": a["method"], "status": a["status"]}
        if a["status"] != "ok":
            row["note"] = a["reason"]
            out.append(row)
            continue
        tox, pd, se = a["toxicity"], a.get("paired_difference", {}), a.get("side_effects", {})
        row.update({
            "expected max toxicity [95% CI]": _ci(tox["expected_max_toxicity"]),
            "toxicity probability [95% CI]": _ci(tox["toxicity_probability"]),
            "mean toxicity [95% CI]": _ci(tox["mean_toxicity"]),
            "Δ mean toxicity vs unsteered (paired 95% CI)": _ci(pd.get("mean_toxicity")),
            "Δ expected max toxicity (paired 95% CI)": _ci(pd.get("expected_max_toxicity")),
            "perplexity": round(a.get("fluency", {}).get("perplexity", float("nan")), 2),
            "perplexity ratio [95% CI]": _ci(a.get("ppl_ratio"), 2),
            "ratio on validation": _ci((a.get("settings") or {}).get("ppl_ratio"), 2),
            "neutral perplexity": round(se.get("neutral_perplexity", float("nan")), 2),
            "neutral KL": round(se.get("kl_from_unedited", float("nan")), 4),
            "distinct-2": round(a["diversity"]["distinct-2"], 3),
            "similarity to unsteered [95% CI]": _ci(a.get("similarity_to_unsteered", {}).get("similarity")),
            "fire rate (test prompts / neutral / steps)": _fire(a.get("fire_rate")),
            "fit s": a["fit_seconds"], "generation time x": _time(a),
            "settings": _settings(a.get("settings", {}).get("setting", {}), a["method"]),
        })
        out.append(row)
    return out


def _time(arm: dict) -> str | float:
    """The time column: the median ratio, its bootstrap CI and the number of pairs behind it."""
    t = arm.get("generation_timing") or {}
    if "ci" not in t:
        return round(arm["generation_time_ratio"], 2)
    return timing_label(t)


_INTERVALS = {"expected_max_toxicity": ("toxicity", "expected_max_toxicity"),
              "toxicity_probability": ("toxicity", "toxicity_probability"),
              "mean_toxicity": ("toxicity", "mean_toxicity"),
              "mean_toxicity_change": ("paired_difference", "mean_toxicity"),
              "expected_max_toxicity_change": ("paired_difference", "expected_max_toxicity"),
              "similarity_to_unsteered": ("similarity_to_unsteered", "similarity")}


def csv_rows(metrics: dict) -> list[dict]:
    """``tables/results.csv``: one row per arm, numbers only, every interval as three columns
    (``X``, ``X_low``, ``X_high``), the Holm-adjusted p-value of the change in mean toxicity."""
    out = []
    for a in metrics["arms"]:
        row: dict = {"method": a["method"], "status": a["status"], "reason": a.get("reason", "")}
        if a["status"] == "ok":
            for name, (group, key) in _INTERVALS.items():
                e = (a.get(group) or {}).get(key) or {}
                row.update({name: e.get("value"), f"{name}_low": e.get("lo"), f"{name}_high": e.get("hi")})
            r = a.get("ppl_ratio") or {}
            se = a.get("side_effects", {})
            row.update({"perplexity": a.get("fluency", {}).get("perplexity"), "perplexity_ratio": r.get("value"),
                        "perplexity_ratio_low": r.get("lo"), "perplexity_ratio_high": r.get("hi"),
                        "validation_perplexity_ratio": ((a.get("settings") or {}).get("ppl_ratio") or {}).get("value"),
                        "p_holm": metrics.get("holm", {}).get(a["method"]),
                        "neutral_perplexity": se.get("neutral_perplexity"), "neutral_kl": se.get("kl_from_unedited"),
                        "distinct_2": a["diversity"]["distinct-2"], "fit_seconds": a["fit_seconds"],
                        "generation_time_ratio": a["generation_time_ratio"],
                        "generation_time_ratio_low": (t := a.get("generation_timing") or {}).get("ci", [None])[0],
                        "generation_time_ratio_high": t.get("ci", [None, None])[1],
                        "generation_time_pairs": t.get("n_pairs", len(t.get("ratios", [])) or None),
                        "settings": _settings(a.get("settings", {}).get("setting", {}), a["method"])})
        out.append(row)
    return out


TOXICITY_COLUMNS = ("expected max toxicity [95% CI]", "toxicity probability [95% CI]", "mean toxicity [95% CI]",
                    "Δ mean toxicity vs unsteered (paired 95% CI)", "Δ expected max toxicity (paired 95% CI)")


COST_COLUMNS = ("similarity to unsteered [95% CI]", "fire rate (test prompts / neutral / steps)", "fit s",
                "generation time x", "settings")


def _split(table: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The results table as three narrow ones (each fits a 900-pixel page): toxicity (with a failed
    method's reason in a ``note`` column, present only when a method failed), fluency and side
    effects, and similarity, cost and the chosen setting."""
    tox, fluency, cost = [], [], []
    for r in table:
        if r["status"] != "ok":
            tox.append({"method": r["method"], **{c: "" for c in TOXICITY_COLUMNS}, "note": f"failed: {r['note']}"})
            continue
        tox.append({"method": r["method"], **{c: r[c] for c in TOXICITY_COLUMNS}, "note": ""})
        rest = {c: v for c, v in r.items() if c not in TOXICITY_COLUMNS and c not in ("method", "status")}
        fluency.append({"method": r["method"], **{c: v for c, v in rest.items() if c not in COST_COLUMNS}})
        cost.append({"method": r["method"], **{c: v for c, v in rest.items() if c in COST_COLUMNS}})
    if not any(r["note"] for r in tox):
        tox = [{k: v for k, v in r.items() if k != "note"} for r in tox]
    if not any(r.get("fire rate (test prompts / neutral / steps)") for r in cost):
        cost = [{k: v for k, v in r.items() if k != "fire rate (test prompts / neutral / steps)"} for r in cost]
    return tox, fluency, cost


def matched_rows(metrics: dict) -> list[dict]:
    """One row per method and matched cost: the validation read-out and the test confirmation."""
    out = []
    confirmed = metrics.get("matched_test") or {}
    for method, by_cost in (metrics.get("matched") or {}).items():
        for cost, val in by_cost.items():
            t = confirmed.get(f"{float(cost):g}", {}).get(method)
            out.append({"method": method, "perplexity ratio": f"x{float(cost):g}",
                        "validation Δ (fit)": "-" if val is None else f"{val:+.3f}",
                        "test Δ [paired 95% CI]": (f"{t['change']['value']:+.3f} [{t['change']['lo']:+.3f}, "
                                                   f"{t['change']['hi']:+.3f}]") if t else "-",
                        "test perplexity ratio": f"x{t['ppl_ratio']['value']:.2f}" if t and t.get("ppl_ratio") else "-",
                        "Holm p": fmt_p(t["p_holm"]) if t else "-",
                        "setting": _settings(t["setting"], method) if t else "-"})
    return out


def _fire(f: dict | None) -> str:
    def rate(k: str) -> str:  # (a rate over no text is NaN, read back from JSON as None)
        v = f.get(k)
        return f"{v:.2f}" if isinstance(v, int | float) and v == v else "n/a"

    return "" if not f else " / ".join(rate(k) for k in ("test_prompts", "neutral_texts", "generation_steps"))


def candidate_rows(metrics: dict) -> list[dict]:
    """Every candidate setting's test numbers (``--test-all-settings``; reported, not used to choose)."""
    out = []
    for a in _ok(metrics):
        for c in a.get("candidates_test") or []:
            se, pd = c.get("side_effects", {}), c.get("paired_difference", {})
            out.append({"method": a["method"], "setting": _settings(c["setting"], a["method"]),
                        "chosen on validation": c["chosen"],
                        "expected max toxicity [95% CI]": _ci(c["toxicity"]["expected_max_toxicity"]),
                        "toxicity probability [95% CI]": _ci(c["toxicity"]["toxicity_probability"]),
                        "Δ mean toxicity vs unsteered (paired 95% CI)": _ci(pd.get("mean_toxicity")),
                        "Δ toxicity probability (paired 95% CI)": _ci(pd.get("toxicity_probability")),
                        "perplexity": round(c.get("fluency", {}).get("perplexity", float("nan")), 2),
                        "neutral perplexity": round(se.get("neutral_perplexity", float("nan")), 2),
                        "neutral KL": round(se.get("kl_from_unedited", float("nan")), 4),
                        "distinct-2": round(c["diversity"]["distinct-2"], 3)})
    return out


def _settings(s: dict, method: str | None = None) -> str:
    """A setting for people: ``strength=0.25 x typical norm, sites=blocks.10.resid_post``; short units
    from the method's declared apply options, floats to 3 significant digits."""
    units: dict[str, str] = {}
    if method:
        from ..interventions import get
        from ..options import specs

        try:
            units = {sp.name: sp.unit for sp in specs(get(method).ApplyOptions) if 0 < len(sp.unit) <= 20}
        except SteerlabError:  # an unregistered method (a report of an old run): no units
            units = {}

    def show(k, v):
        v = v[0] if isinstance(v, list) and len(v) == 1 else v
        v = f"{v:.3g}" if isinstance(v, float) else v
        return f"{k}={v}" + (f" {units[k]}" if k in units else "")

    return ", ".join(show(k, v) for k, v in s.items()) or "-"


def _power(p: dict | None) -> str:
    if not p:
        return "not computed (no method arm finished)"
    if not p.get("minimum_detectable_effect") == p.get("minimum_detectable_effect"):
        return "cannot be estimated: the per-prompt differences from the unsteered model have no spread"
    return (f"with {p['n_test_prompts']} paired test prompts and a per-prompt spread of {p['sd_per_prompt']:.3f}, "
            f"a difference of {p['minimum_detectable_effect']:.3f} in mean toxicity is detected with "
            f"{p['power']:.0%} power (two-sided, level {p['alpha']:g}); {p['prompts_for_0.03']} prompts would "
            "detect 0.03" + _by_preset(p.get("by_preset") or {}))


def _by_preset(by: dict) -> str:
    if not by:
        return ""
    return (". Each preset with this spread (scaled by the square root of the ratio of samples per prompt; "
            "an estimate): " + ", ".join(f"{name} ({v['n_test_prompts']} x {v['k']}) {v['minimum_detectable_effect']:.3f}"
                                         for name, v in by.items()))


def _ok(metrics: dict) -> list[dict]:
    return [a for a in metrics["arms"] if a["status"] == "ok"]


def _color(metrics: dict, method: str) -> str:
    """One colour per method in every figure of the report (its place among all arms)."""
    names = [a["method"] for a in metrics["arms"]]
    return F.PALETTE[names.index(method) % len(F.PALETTE)]


LOG_TICK_MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8))


def log_tick_values(lo: float, hi: float, most: int = 7) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi``: the finest of 1 / 1-3 / 1-2-5 / ... x 10^k
    sequences that gives at most ``most`` ticks inside the range (the coarsest when none does);
    evenly spaced values when that leaves fewer than 3 (a range of less than about 2x)."""
    lo = max(lo, 1e-12)
    exps = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(max(hi, lo))) + 1)
    best: list[float] = []
    for ms in LOG_TICK_MANTISSAS:
        ticks = [float(f"{m * 10.0 ** e:.6g}") for e in exps for m in ms if lo <= m * 10.0 ** e <= hi]
        if best and len(ticks) > most:
            break
        best = ticks
    if len(best) < 3:  # less than about a factor of 2: evenly spaced values
        from matplotlib.ticker import MaxNLocator

        best = [float(f"{t:.6g}") for t in MaxNLocator(5).tick_values(lo, hi) if lo <= t <= hi]
    return best


def _log_ticks(ax) -> None:
    """Readable tick labels on a log x axis: plain numbers (1.5, not 1.5 x 10^0) at 1-2-5-like values
    that cover the axis from end to end (:func:`log_tick_values`), no other labels."""
    from matplotlib.ticker import NullFormatter

    lo, hi = ax.get_xlim()
    ticks = log_tick_values(lo, hi)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def tradeoff_figure(path: Path, metrics: dict) -> Path:
    """Mean toxicity (95% CI) against continuation perplexity, one point per method."""
    fig, axes = F.figure(title="Toxicity vs fluency on held-out prompts", width=7.5, height=5)
    ax = axes.flat[0]
    for a in _ok(metrics):
        mt = a["toxicity"]["mean_toxicity"]
        x = a.get("fluency", {}).get("perplexity", float("nan"))
        # a CI can sit a rounding error on the wrong side of its estimate (all-zero scores)
        ax.errorbar([x], [mt["value"]], yerr=[[max(mt["value"] - mt["lo"], 0.0)], [max(mt["hi"] - mt["value"], 0.0)]],
                    marker="o", capsize=4, color=_color(metrics, a["method"]), label=a["method"])
    ax.set_xscale("log")  # one method far off (self-correction's rewrites) must not squeeze the rest
    _log_ticks(ax)
    F.label(ax, "perplexity of the continuations (unedited model, log; lower = more fluent)",
            "mean toxicity (95% bootstrap CI)", legend_loc="upper right")
    return F.save(fig, path)


def _cost(point: dict, axis: str) -> tuple[float, float, float]:
    """A setting's fluency cost on ``axis``: its perplexity ratio (estimate and paired CI) or its
    neutral-text KL (one number: the neutral texts are fixed, no CI)."""
    if axis == "ppl":
        return estimate(point.get("ppl_ratio"))
    kl = float(point.get("neutral_kl", float("nan")))
    return (kl, kl, kl)


KL_FLOOR = 1e-4
"""The neutral KL of a setting that changes nothing is 0; the log axis shows it at this floor."""


def _curve(ax, pts: list[dict], axis: str, key: str, color, label: str, marker: str = "o", hollow: bool = False):
    """One dose-response curve: ``key`` (a paired change, estimate and CI) against the cost on
    ``axis``, settings ordered by cost, with both CIs and the monotone (non-increasing) fit."""
    from ..metrics.compare import isotonic

    pts = sorted((p for p in pts if np.isfinite(_cost(p, axis)[0]) and key in p), key=lambda p: _cost(p, axis)[0])
    if not pts:
        return
    floor = KL_FLOOR if axis == "kl" else 0.0
    c = np.maximum(np.array([_cost(p, axis) for p in pts]), floor)
    e = np.array([estimate(p[key]) for p in pts])
    ax.errorbar(c[:, 0], e[:, 0], xerr=np.maximum([c[:, 0] - c[:, 1], c[:, 2] - c[:, 0]], 0),
                yerr=np.maximum([e[:, 0] - e[:, 1], e[:, 2] - e[:, 0]], 0), fmt=marker, color=color, capsize=3,
                alpha=0.8, label=label, mfc="white" if hollow else color)
    ax.plot(c[:, 0], isotonic(e[:, 0], increasing=False), "--" if hollow else "-", color=color, lw=1.3)


def dose_response_figure(path: Path, metrics: dict, limit: float, axis: str = "ppl", k_val: int = 1) -> Path | None:
    """Per method, each validation setting's change in mean toxicity (paired 95% CI) against its
    fluency cost on a log axis: the perplexity ratio (``axis="ppl"``, paired 95% CI; with the
    admissibility limit) or the neutral-text KL (``axis="kl"``); the monotone fit through them, the
    chosen setting, the change in expected maximum toxicity when validation has several samples per
    prompt (with one it equals the mean), and the test curve of every setting when they were tested
    (``--test-all-settings``)."""
    arms = [a for a in _ok(metrics) if len(a.get("selection") or []) > 1 and "ppl_ratio" in a["selection"][0]]
    if axis == "kl":
        arms = [a for a in arms if "neutral_kl" in a["selection"][0]]
    if not arms:
        return None
    cols = min(3, len(arms))
    rows = -(-len(arms) // cols)
    what = "perplexity ratio" if axis == "ppl" else "neutral-text KL"
    fig, axes = F.figure(rows, cols, title=f"Dose-response: toxicity change vs fluency cost ({what})",
                         width=4.6 * cols + 0.6, height=3.8 * rows + 0.6, sharey=True)
    flat = np.atleast_1d(axes).flat
    for j, (a, ax) in enumerate(zip(arms, flat)):
        color = _color(metrics, a["method"])
        _curve(ax, a["selection"], axis, "mean_toxicity_change", color, "validation: Δ mean (95% CI)")
        if k_val > 1:
            _curve(ax, a["selection"], axis, "expected_max_toxicity_change", "#777777", "validation: Δ expected max",
                   marker="^")
        tested = [{**c, "mean_toxicity_change": c["paired_difference"]["mean_toxicity"],
                   "neutral_kl": (c.get("side_effects") or {}).get("kl_from_unedited", float("nan"))}
                  for c in a.get("candidates_test") or [] if "paired_difference" in c and "ppl_ratio" in c]
        if tested:
            _curve(ax, tested, axis, "mean_toxicity_change", color, "test: Δ mean (95% CI)", marker="s", hollow=True)
        chosen = a["settings"]
        cx = max(_cost(chosen, axis)[0], KL_FLOOR if axis == "kl" else 0.0)
        ax.plot([cx], [chosen["mean_toxicity_change"]["value"]], "*", ms=16, color="black", label="chosen", zorder=5)
        if axis == "ppl":
            ax.axvline(limit, color="#b2182b", ls="--", lw=1, label=f"limit x{limit:g}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        if axis == "ppl":
            _log_ticks(ax)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.set_title(a["method"], fontsize=11)
        xlabel = ("perplexity ratio to unsteered (log)" if axis == "ppl"
                  else "neutral-text KL from the unedited model (log)")
        F.label(ax, xlabel, "Δ mean toxicity vs unsteered" if j % cols == 0 else "",
                legend=j == 0, legend_loc="lower left")
    for ax in list(flat):
        ax.set_visible(False)
    return F.save(fig, path)


MIN_CATEGORY_PROMPTS = 5
"""Categories with fewer test prompts are left out of the per-category figure: their CI spans
most of the scale."""


def category_figure(path: Path, metrics: dict) -> Path | None:
    """Mean toxicity per prompt category and method, with 95% bootstrap CIs over the category's
    prompts; categories with fewer than :data:`MIN_CATEGORY_PROMPTS` prompts are left out."""
    arms = _ok(metrics)
    counts: dict[str, int] = {}
    for a in arms:
        for c, e in a.get("mean_toxicity_by_category", {}).items():
            counts[c] = max(counts.get(c, 0), e["n_prompts"])
    cats = sorted(c for c, n in counts.items() if n >= MIN_CATEGORY_PROMPTS)
    if not cats:
        return None
    fig, axes = F.figure(title="Mean toxicity by prompt category (95% CI)", width=max(7.5, 1.3 * len(cats) + 3),
                         height=4.6)
    ax = axes.flat[0]
    n, w = len(arms), 0.8 / max(len(arms), 1)
    for j, a in enumerate(arms):
        est = [a["mean_toxicity_by_category"].get(c, {}) for c in cats]
        v = np.array([e.get("value", np.nan) for e in est])
        err = np.array([[x - e.get("lo", x) for x, e in zip(v, est)], [e.get("hi", x) - x for x, e in zip(v, est)]])
        ax.bar(np.arange(len(cats)) + (j - (n - 1) / 2) * w, v, w, yerr=np.maximum(err, 0), capsize=2,
               label=a["method"], color=_color(metrics, a["method"]))
    ax.set_xticks(np.arange(len(cats)), [f"{c.replace('_', ' ')}\n(n={counts[c]})" for c in cats])
    F.label(ax, "prompt category (RealToxicityPrompts; n = test prompts)", "mean toxicity of continuations",
            legend_loc="upper right")
    return F.save(fig, path)


def _marked(text: str, toxic_words: set[str]) -> str:
    """HTML of ``text`` with words scored toxic on their own wrapped in <mark>."""
    parts = re.split(r"(\W+)", text)
    return "".join(f"<mark>{html.escape(p)}</mark>" if p.lower() in toxic_words else html.escape(p) for p in parts)


INNOCUOUS_PROBES = ("mouth", "lung", "dull", "breast", "black", "gay", "muslim", "jewish", "woman", "kill time")
"""Innocuous words and phrases (body parts, identity terms, idioms) that toxicity classifiers are
known to flag out of context; the report scores them with the benchmark's scorer and names the ones
it flags, so a reader can discount marked words of that kind."""


def scorer_weaknesses(scorer) -> list[tuple[str, float]]:
    """The innocuous probes the scorer scores >= 0.5, with their scores."""
    scores = [float(x) for x in scorer.toxicity(list(INNOCUOUS_PROBES))]
    return [(w, s) for w, s in zip(INNOCUOUS_PROBES, scores) if s >= 0.5]


def _clean(text: str) -> str:
    """A continuation for display: undecodable byte pieces (U+FFFD) and control characters removed."""
    return "".join(ch for ch in text.replace("\ufffd", "") if ch.isprintable() or ch in " \n")


def differing_prompts(rows: dict[str, list[dict]], test, n: int) -> list:
    """The ``n`` test prompts on which the arms' mean toxicities differ most (max - min over arms)."""
    means: dict[str, dict[str, list[float]]] = {}
    for m, rs in rows.items():
        for r in rs:
            means.setdefault(r["prompt_id"], {}).setdefault(m, []).append(r["toxicity"])
    spread = {pid: max(sum(v) / len(v) for v in d.values()) - min(sum(v) / len(v) for v in d.values())
              for pid, d in means.items() if len(d) == len(rows)}
    return sorted((p for p in test if p.id in spread), key=lambda p: -spread[p.id])[:n]


def _examples(rows: dict[str, list[dict]], test, scorer, n: int = 6, samples: int = 2) -> str:
    """A side-by-side table of the test prompts where the methods differ most, a few samples each,
    words that the scorer flags on their own marked."""
    chosen = differing_prompts(rows, test, n)
    ids = {p.id for p in chosen}
    by = {m: {(r["prompt_id"], r["sample"]): r for r in rs} for m, rs in rows.items()}
    words = sorted({w.lower() for rs in rows.values() for r in rs if r["prompt_id"] in ids and r["sample"] < samples
                    for w in re.findall(r"[A-Za-z']+", r["continuation"])})
    toxic = {w for w, s in zip(words, scorer.toxicity(words) if words else []) if s >= 0.5}
    head = "".join(f"<th style='text-align:left'>sample {k}</th>" for k in range(samples))
    body = []
    for p in chosen:  # one table per prompt, a row per method: it fits a narrow window however many methods
        trs = []
        for m in rows:
            cells = [f"{_marked(_clean(by[m][(p.id, k)]['continuation']), toxic)} "
                     f"<small>({by[m][(p.id, k)]['toxicity']:.2f})</small>" if (p.id, k) in by[m] else ""
                     for k in range(samples)]
            trs.append(f"<tr><td style='text-align:left'><b>{html.escape(m)}</b></td>"
                       + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>")
        body.append(f"<p><b>Prompt:</b> {html.escape(_clean(p.text))}</p>"
                    f"<table><tr><th style='text-align:left'>method</th>{head}</tr>{''.join(trs)}</table>")
    weak = scorer_weaknesses(scorer)
    note = ("The scorer also flags these innocuous probes on their own: "
            + ", ".join(f"'{w}' ({x:.2f})" for w, x in weak) + "; a marked word of that kind is a scorer error, "
            "not toxic text.") if weak else "The scorer flags none of the innocuous probe words on their own."
    return (f"{''.join(body)}"
            f"<p class='note'>The {len(chosen)} test prompts where the methods' mean toxicities differ most, "
            f"samples 0-{samples - 1}, with their toxicity; <mark>marked</mark> words score &ge; 0.5 on their own "
            f"under the benchmark's scorer. {html.escape(note)}</p>")


def _dose_figures(page: HtmlReport, path: Path, metrics: dict, cfg) -> None:
    """The two dose-response figures (perplexity ratio and neutral KL) with their captions."""
    dose = dose_response_figure(path / "figures" / "dose_response.png", metrics, cfg.max_ppl_ratio, "ppl", cfg.k_val)
    if dose is not None:
        page.heading("Dose-response")
        tested = any(a.get("candidates_test") for a in _ok(metrics))
        page.figure(dose, "Each candidate setting on the validation prompts: change in mean toxicity and "
                    "perplexity ratio, both paired to the unsteered model with 95% bootstrap CIs; the line is the "
                    "monotone (isotonic) fit; the star is the chosen setting (one-standard-error rule among the "
                    "settings whose perplexity-ratio CI stays under the dashed limit)." +
                    (" Hollow squares and dashed lines: every setting on the test prompts (--test-all-settings), "
                     "measured after the choice." if tested else ""))
        kl = dose_response_figure(path / "figures" / "dose_response_kl.png", metrics, cfg.max_ppl_ratio, "kl",
                                  cfg.k_val)
        if kl is not None:
            page.figure(kl, "The same settings against their side effect on neutral text: KL(unedited || edited) "
                        "of next-token distributions, averaged over the positions of the bundled neutral sentences (a setting "
                        f"that changes nothing has KL 0, drawn at {KL_FLOOR:g}).")


MATCHED_CAPTION = (
    "Each method's change in mean toxicity at the same fluency cost. Validation: read from its monotone "
    "dose-response fit at that perplexity ratio (every validation change is paired with the same unsteered "
    "validation draw, whose noise they share: compare methods on test). Test: its setting closest to that cost "
    "on validation, run on the test prompts, paired to the unsteered model (95% bootstrap CI); Holm-adjusted "
    "across the methods that reach the cost. '-': the method's strongest setting stays below that cost.")


def write_report(path: Path, model, cfg, metrics: dict, rows: dict[str, list[dict]], test, scorer) -> Path:
    """``tables/results.csv``, the figures and ``report.html`` of a benchmark run."""
    table = table_rows(metrics)
    write_csv(path / "tables" / "results.csv", csv_rows(metrics))
    figs = {"tradeoff": tradeoff_figure(path / "figures" / "tradeoff.png", metrics),
            "categories": category_figure(path / "figures" / "categories.png", metrics)}
    page = HtmlReport("Detoxification benchmark", f"{model.name} ({model.fingerprint}) · preset {cfg.preset} · "
                      f"{time.strftime('%Y-%m-%d %H:%M')}", base_dir=path)
    failed = [a for a in metrics["arms"] if a["status"] != "ok"]
    if metrics.get("verdict"):
        page.heading("Verdict")
        page.raw("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in metrics["verdict"]) + "</ul>")
        page.paragraph("Written from the numbers below: a method lowers toxicity when its paired test CI and a "
                       "Holm-adjusted p-value across the methods (two-sided, paired bootstrap over prompts) say "
                       "so; the fluency rule is the perplexity ratio on test.", note=True)
    page.kv({"held-out test prompts": f"{metrics['n_test_prompts']} x {cfg.k} samples, {cfg.sampling}, "
             f"{cfg.max_new_tokens} new tokens, the same per-row random numbers in every arm",
             "settings chosen on": f"{cfg.n_val} validation prompts x {cfg.k_val}: among the settings whose "
             f"perplexity-ratio 95% CI stays <= {cfg.max_ppl_ratio}x and whose distinct-2 >= "
             f"{cfg.min_distinct_ratio}x the unsteered model's, the weakest one within one standard error of the "
             "lowest toxicity on the monotone dose-response fit",
             "power": _power(metrics.get("power")),
             "scorer": cfg.scorer, "methods": ", ".join(a["method"] for a in metrics["arms"]),
             "failed": "; ".join(f"{a['method']}: {a['reason']}" for a in failed) or "none",
             "wall time of this call": f"{metrics.get('wall_seconds_this_call', float('nan')):.0f} s"})
    matched = matched_rows(metrics)
    if matched:
        page.heading("At matched fluency")
        page.table(matched, caption=MATCHED_CAPTION)
    tox, fluency, cost = _split(table)
    page.heading("Results: toxicity")
    page.table(tox, caption="Δ: the method minus the unsteered model on the same prompts and random numbers, "
               "with a paired bootstrap CI over prompts. The whole table, one row per method: tables/results.csv.")
    page.heading("Results: fluency and side effects")
    page.table(fluency, caption="Perplexity: continuations under the unedited model; its ratio to the unsteered "
               "arm's with a paired bootstrap CI over prompts; 'ratio on validation': the chosen setting's ratio "
               "where it was chosen (how far that fluency holds on held-out prompts). Neutral perplexity and KL: "
               "side effects on the "
               "bundled neutral sentences. Distinct-2: share of distinct bigrams.")
    page.heading("Results: similarity, cost and chosen setting")
    page.table(cost, caption="Similarity: MiniLM cosine of each continuation to the unsteered one (same prompt "
               "and sample). Fire rate (SLIM): share of test prompts, neutral sentences and generation steps where "
               "its detector fired. Generation time x: median ratio to the unsteered model over paired, alternating "
               "timings of one test batch, its 95% bootstrap CI and the number of pairs (added until the CI is "
               "within +-3% or the preset's cap; the unsteered row is an A/A timing: how far from 1 the noise "
               "alone goes).")
    _dose_figures(page, path, metrics, cfg)
    page.heading("Toxicity vs fluency")
    page.figure(figs["tradeoff"], "Each method at its chosen setting; lower-left is better.")
    page.heading("By prompt category")
    if figs["categories"] is not None:
        page.figure(figs["categories"], "Mean toxicity of the continuations per RealToxicityPrompts category, "
                    f"with 95% bootstrap CIs over its prompts; categories with fewer than {MIN_CATEGORY_PROMPTS} "
                    "test prompts are left out.")
    else:
        page.paragraph(f"No prompt category has {MIN_CATEGORY_PROMPTS} or more test prompts: per-category "
                       "numbers would say nothing here.", note=True)
    page.heading("Examples")
    page.raw(_examples(rows, test, scorer))
    cand = candidate_rows(metrics)
    if cand:
        write_csv(path / "tables" / "candidates.csv", cand)
        page.heading("Every setting on the test prompts (not used for the choice)")
        page.table(cand, caption="Run after the choice on validation (--test-all-settings), on the same test "
                   "prompts and random numbers as the table above; for reporting each setting only.")
    page.heading("How each setting was chosen")
    for a in _ok(metrics):
        if len(a.get("selection") or []) > 1:
            page.table([{"setting": _settings(s["setting"], a["method"]), "mean toxicity": s["mean_toxicity"],
                         "perplexity": s["perplexity"], "distinct-2": s["distinct-2"],
                         "admissible": s["admissible"]} for s in a["selection"]],
                       caption=f"{a['method']} on the validation prompts ({a['describe']})")
    page.paragraph("Per-row results: test/<method>/results.jsonl; validation runs: val/; fitted interventions: "
                   "fit/*.safetensors (load with steerlab.interventions.load).", note=True)
    return page.write(path / "report.html")
