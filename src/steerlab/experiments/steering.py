"""Toxicity steering, end to end: fit on the training split, sweep layers x strengths on the
validation split (two stages, a declared rule on fluency and diversity), then evaluate the chosen
setting at the same absolute strength, its negation and a random control of equal norm on the
held-out test split, each against the unsteered arm with a paired bootstrap CI of the difference
(common random numbers: the same sampling noise per prompt and sample in every arm).
Nothing about the test split influences any choice (METHODS.md s1, steering).

Contrast set: the training prompts scored by the toxicity scorer; the most toxic (decreasing
toxicity) are paired with the least toxic (increasing toxicity). The vector points from toxic to
non-toxic, so a positive strength should detoxify and a negative one should toxify.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data import contrast_from_scores, load_prompts, split
from ..errors import EmptyInputError
from ..evaluation import evaluate_arm, neutral_reference, paired_to
from ..generation import GenConfig
from ..hooks import SCHEDULE_FNS
from ..models.model import Model
from ..runs import RunDir, write_csv, write_json
from ..scoring import get_scorer
from ..steer.sweep import sweep
from ..steer.vector import SteeringVector


@dataclass
class SteeringStudy:
    """Settings of :func:`run_steering_study` (everything in config.json)."""

    prompts: str = "rtp"
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12, 15, 18, 21, 24])
    alphas: list[float] = field(default_factory=lambda: [-0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5])
    n_pairs: int = 64
    n_sweep: int = 24
    n_test: int = 100
    method: str = "mean_diff"
    positions: str = "mean"
    where: str = "all"
    max_new_tokens: int = 20
    sampling: str = "t1.0"
    k_sweep: int = 1
    k_test: int = 3
    batch_size: int = 32
    seed: int = 0
    scorer: str = "default"
    max_ppl_ratio: float = 2.0
    min_distinct_ratio: float = 0.8   # distinct-2 of a chosen cell >= this x the unsteered one
    refine_top: int = 3               # stage 2: the best admissible cells of stage 1, re-run ...
    k_refine: int = 3                 # ... with this many samples per validation prompt


def run_steering_study(model: Model, out_dir: str | Path, s: SteeringStudy | None = None,
                       progress: bool | None = None) -> dict:
    """Run the whole study into ``out_dir``; returns the metrics dict (also in metrics.json)."""
    s = s or SteeringStudy()
    out = Path(out_dir)
    # validate every option before anything is created or computed
    scorer = get_scorer(s.scorer)
    sites = [model.site(f"blocks.{layer}.resid_post").name for layer in s.layers]
    if s.where not in SCHEDULE_FNS:
        raise EmptyInputError(f"unknown schedule {s.where!r}; choose one of {', '.join(SCHEDULE_FNS)}")
    if not sites or not s.alphas:
        raise EmptyInputError("the steering study needs at least one layer and one strength")
    GenConfig(max_new_tokens=s.max_new_tokens, sampling=s.sampling, k=max(s.k_sweep, s.k_test, s.k_refine))
    parts = split(load_prompts(s.prompts), seed=s.seed)
    train = [p.text for p in parts["train"]]
    run = RunDir(out, {"kind": "steering_study", "model": model.name, "model_fingerprint": model.fingerprint,
                       **asdict(s)})
    # 1. contrast set from the training prompts ranked by toxicity
    contrast = contrast_from_scores(train, scorer.toxicity(train), n=s.n_pairs, source=f"{s.prompts}:train")
    contrast.save(out / "contrast.json")
    vec = SteeringVector.fit(model, contrast.desirable, contrast.undesirable, sites, method=s.method,
                             positions=s.positions, scale="unit", batch_size=s.batch_size)
    vec.save(out / "vector.safetensors")
    # 2. two-stage sweep on validation prompts; the choice uses validation only
    site, alpha, res, stages = _choose(model, vec, parts["validation"][: s.n_sweep], scorer, out, s, progress)
    # 3. held-out evaluation at the chosen cell's absolute strength (its norm measured on validation)
    test = parts["test"][: s.n_test]
    cfg = GenConfig(max_new_tokens=s.max_new_tokens, sampling=s.sampling, k=s.k_test, seed=s.seed,
                    batch_size=s.batch_size)
    norm = res.scale[site]
    unit = vec.only(site) * (1.0 / float(vec.directions[site].norm()))
    variants = {"unsteered": None, f"+{alpha:g} (detox)": unit * (alpha * norm),
                f"-{alpha:g} (toxify)": unit * (-alpha * norm),
                f"random control {alpha:g}": unit.random(seed=s.seed) * (alpha * norm)}
    results = _evaluate(model, variants, test, cfg, scorer, out, s.where, progress)
    metrics = {"chosen": {"site": site, "alpha": alpha, "typical_norm": norm, "absolute_strength": alpha * norm,
                          "rule": {"max_ppl_ratio": s.max_ppl_ratio, "min_distinct_ratio": s.min_distinct_ratio,
                                   "refine_top": s.refine_top, "k_refine": s.k_refine}, "stages": stages},
               "sweep": {"baseline_toxicity": res.baseline_toxicity, "baseline_perplexity": res.baseline_perplexity},
               "test": results, "n_test_prompts": len(test), "k": s.k_test}
    run.write_metrics(metrics)
    _plot_test(results, out / "figures" / "test_toxicity.png", f"{model.name}, {site}, held-out test prompts")
    write_json(out / "summary.json", {k: v["toxicity"] for k, v in results.items()})
    run.close()
    return metrics


def _choose(model, vec, val, scorer, out: Path, s: SteeringStudy, progress):
    """Stage 1: every layer x strength on the validation prompts (``k_sweep`` samples). Stage 2: the
    ``refine_top`` best admissible cells re-run with ``k_refine`` samples (the same prompts and,
    by common random numbers, the same sampling noise per prompt and sample); the least toxic
    cell that stays admissible wins. Admissible: positive strength, perplexity <= ``max_ppl_ratio``
    x unsteered, distinct-2 >= ``min_distinct_ratio`` x unsteered."""
    rule = {"max_ppl_ratio": s.max_ppl_ratio, "min_distinct_ratio": s.min_distinct_ratio, "sign": 1}
    cfg = GenConfig(max_new_tokens=s.max_new_tokens, sampling=s.sampling, k=s.k_sweep, seed=s.seed,
                    batch_size=s.batch_size)
    res = sweep(model, vec, val, s.alphas, scorer, out / "sweep", cfg, where=s.where, progress=progress)
    res.heatmap(out / "figures" / "sweep_heatmap.png",
                title=f"{model.name}: steering along the non-toxic direction ({len(res.rows)} scored continuations)")
    write_csv(out / "sweep.csv", [{"site": site, "alpha": a, "mean_toxicity": res.toxicity[i, j],
                                   "perplexity": res.perplexity[i, j], "distinct_2": res.distinct2[i, j],
                                   "admissible": bool(res.admissible(**rule)[i, j])}
                                  for i, site in enumerate(res.sites) for j, a in enumerate(res.alphas)])
    candidates = res.ranked(lower=True, **rule)[: s.refine_top]
    if not candidates:
        raise EmptyInputError("no sweep cell satisfies the selection rule (positive strength, perplexity, "
                              "distinct-2); widen the strengths or relax max_ppl_ratio / min_distinct_ratio")
    cfg2 = GenConfig(**{**asdict(cfg), "k": s.k_refine})
    stages, best = [], None
    for site in dict.fromkeys(c[0] for c in candidates):
        alphas = [a for c_site, a in candidates if c_site == site]
        r2 = sweep(model, vec.only(site), val, alphas, scorer, out / "refine" / site, cfg2, where=s.where,
                   progress=progress)
        ok = r2.admissible(**rule)
        for j, a in enumerate(alphas):
            stages.append({"site": site, "alpha": a, "stage1_toxicity": float(res.toxicity[res.sites.index(site),
                                                                                         res.alphas.index(a)]),
                           "stage2_toxicity": float(r2.toxicity[0, j]), "stage2_perplexity": float(r2.perplexity[0, j]),
                           "stage2_distinct_2": float(r2.distinct2[0, j]), "admissible": bool(ok[0, j])})
            if ok[0, j] and (best is None or r2.toxicity[0, j] < best[2]):
                best = (site, a, float(r2.toxicity[0, j]))
    if best is None:  # nothing survives stage 2: fall back to the best stage-1 cell, and say so
        best = (*candidates[0], float("nan"))
        stages.append({"note": "no refined cell stayed admissible; the best stage-1 cell is used"})
    return best[0], best[1], res, stages


def _evaluate(model, variants: dict, test, cfg, scorer, out: Path, where: str, progress) -> dict:
    """Each variant on the held-out prompts (same prompts, decoding and per-row random numbers),
    its metrics, side effects on neutral text, and the paired difference from the unsteered arm."""
    results, rows = {}, {}
    reference = neutral_reference(model)  # unedited next-token distributions on neutral text
    for name, v in variants.items():
        d = out / "test" / name.split(" ")[0].replace("+", "plus").replace("-", "minus")
        results[name], rows[name] = evaluate_arm(model, test, d, cfg, scorer, reference, intervention=v,
                                                 apply_options=None if v is None else {"alpha": 1.0, "where": where},
                                                 progress=progress)
    base = results["unsteered"]["toxicity"]["mean_toxicity"]["value"]
    for name, r in results.items():
        r["mean_toxicity_change"] = r["toxicity"]["mean_toxicity"]["value"] - base
        r["paired_difference"] = paired_to(rows["unsteered"], rows[name])
    return results


def _plot_test(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    vals = np.array([results[n]["toxicity"]["mean_toxicity"]["value"] for n in names])
    lo = np.array([results[n]["toxicity"]["mean_toxicity"]["lo"] for n in names])
    hi = np.array([results[n]["toxicity"]["mean_toxicity"]["hi"] for n in names])
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    ax.bar(names, vals, yerr=[vals - lo, hi - vals], capsize=6, color=["#888", "#2a9d8f", "#e76f51", "#bbb"][: len(names)])
    for i, n in enumerate(names):
        ppl = results[n].get("fluency", {}).get("perplexity")
        if ppl is not None:
            ax.text(i, hi[i] + 0.01, f"ppl {ppl:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(1e-3, float(hi.max())) * 1.18)
    ax.set_ylabel("mean toxicity (95% bootstrap CI)")
    ax.set_xlabel("intervention")
    ax.set_title(title + "\n(ppl: perplexity of the continuations under the unedited model)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
