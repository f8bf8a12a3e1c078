"""Toxicity steering, end to end: fit on the training split, sweep layers x strengths on the
validation split, then evaluate the chosen setting, its negation and a random control of equal
norm on the held-out test split with bootstrap confidence intervals (METHODS.md s1, steering).

Contrast set: the training prompts scored by the toxicity scorer; the most toxic (decreasing
toxicity) are paired with the least toxic (increasing toxicity). The vector points from toxic to
non-toxic, so a positive strength should detoxify and a negative one should toxify.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data import contrast_from_scores, load_prompts, split
from ..evaluation import neutral_reference, side_effects, summarize
from ..generation import GenConfig, generate_run
from ..models.model import Model
from ..runs import RunDir, write_json_atomic
from ..scoring import get_scorer
from ..steer.sweep import sweep, typical_norms
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


def run_steering_study(model: Model, out_dir: str | Path, s: SteeringStudy | None = None,
                       progress: bool | None = None) -> dict:
    """Run the whole study into ``out_dir``; returns the metrics dict (also in metrics.json)."""
    s = s or SteeringStudy()
    out = Path(out_dir)
    run = RunDir(out, {"kind": "steering_study", "model": model.name, "model_fingerprint": model.fingerprint,
                       **asdict(s)})
    scorer = get_scorer(s.scorer)
    parts = split(load_prompts(s.prompts), seed=s.seed)
    train = [p.text for p in parts["train"]]
    # 1. contrast set from the training prompts ranked by toxicity
    contrast = contrast_from_scores(train, scorer.toxicity(train), n=s.n_pairs, source=f"{s.prompts}:train")
    contrast.save(out / "contrast.json")
    sites = [f"blocks.{layer}.resid_post" for layer in s.layers]
    vec = SteeringVector.fit(model, contrast.desirable, contrast.undesirable, sites, method=s.method,
                             positions=s.positions, scale="unit", batch_size=s.batch_size)
    vec.save(out / "vector.safetensors")
    # 2. sweep on validation prompts
    cfg_sweep = GenConfig(max_new_tokens=s.max_new_tokens, sampling=s.sampling, k=s.k_sweep, seed=s.seed,
                          batch_size=s.batch_size)
    res = sweep(model, vec, parts["validation"][: s.n_sweep], s.alphas, scorer, out / "sweep", cfg_sweep,
                where=s.where, progress=progress)
    res.heatmap(out / "figures" / "sweep_heatmap.png",
                title=f"{model.name}: steering along the non-toxic direction ({len(res.rows)} scored continuations)")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site", "alpha", "mean_toxicity", "perplexity"])
        for i, site in enumerate(res.sites):
            for j, a in enumerate(res.alphas):
                w.writerow([site, a, f"{res.toxicity[i, j]:.4f}", f"{res.perplexity[i, j]:.2f}"])
    site, alpha = res.best(lower=True, max_ppl_ratio=s.max_ppl_ratio, sign=1)
    # 3. held-out evaluation
    test = parts["test"][: s.n_test]
    cfg = GenConfig(max_new_tokens=s.max_new_tokens, sampling=s.sampling, k=s.k_test, seed=s.seed,
                    batch_size=s.batch_size)
    norm = typical_norms(model, [p.text for p in test[:32]], [site])[site]
    unit = vec.only(site) * (1.0 / float(vec.directions[site].norm()))
    variants = {"unsteered": None, f"+{alpha:g} (detox)": unit * (alpha * norm),
                f"-{alpha:g} (toxify)": unit * (-alpha * norm),
                f"random control {alpha:g}": unit.random(seed=s.seed) * (alpha * norm)}
    results = {}
    reference = neutral_reference(model)  # unedited next-token distributions on neutral text
    for name, v in variants.items():
        d = out / "test" / name.split(" ")[0].replace("+", "plus").replace("-", "minus")
        if v is None:
            rows = generate_run(model, test, d, cfg, scorer=scorer, progress=progress)
            effects = side_effects(model, reference)
        else:
            with v.apply(model, alpha=1.0, where=s.where):
                rows = generate_run(model, test, d, cfg, scorer=scorer, progress=progress)
                effects = side_effects(model, reference)
        results[name] = summarize(rows, fluency_model=model)  # fluency outside the edit: unedited model
        results[name]["side_effects"] = effects
    base = results["unsteered"]["toxicity"]["mean_toxicity"]
    metrics = {"chosen": {"site": site, "alpha": alpha, "typical_norm": norm},
               "sweep": {"baseline_toxicity": res.baseline_toxicity, "baseline_perplexity": res.baseline_perplexity},
               "test": results, "n_test_prompts": len(test), "k": s.k_test}
    for r in results.values():
        m = r["toxicity"]["mean_toxicity"]
        r["mean_toxicity_change"] = m["value"] - base["value"]
        r["ci_disjoint_from_unsteered"] = bool(m["hi"] < base["lo"] or m["lo"] > base["hi"])
    run.write_metrics(metrics)
    _plot_test(results, out / "figures" / "test_toxicity.png", f"{model.name}, {site}, held-out test prompts")
    write_json_atomic(out / "summary.json", {k: v["toxicity"] for k, v in results.items()})
    return metrics


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
