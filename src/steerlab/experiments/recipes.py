"""Benchmark recipes: how ``steerlab bench`` runs each method (what to fit on its training data,
which apply settings to try on validation, method-specific measurements at the chosen setting,
whether it runs when no ``--methods`` are given). They live beside the benchmark, not in the method
classes; a method without a recipe is fitted on the contrast set and tried at its default options.
Add one with :func:`register_recipe`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SteerlabError
from ..interventions import METHODS, Intervention, InterventionError
from ..models.model import Model
from ..registry import Registry


@dataclass
class BenchData:
    """What the benchmark gives every method to fit on: the training prompts (texts, their
    toxicity under the benchmark's scorer), a toxicity contrast set built from them (the least
    toxic paired with the most toxic), validation prompts (for settings that need a scale), the
    scorer and the seed. Nothing here comes from the test split."""

    train: list[str]
    train_scores: list[float]
    contrast: Any
    validation: list[str]
    scorer: Any
    seed: int = 0
    pool: Any = None  # the model's own scored continuations of the training prompts (experiments.pool.Pool)


def fit_on_contrast(cls: type[Intervention], model: Model, data: BenchData, preset: str) -> Intervention:
    """The default fit: ``cls.fit(model, data.contrast)``."""
    return cls.fit(model, data.contrast)


def default_settings(iv: Intervention, model: Model, data: BenchData, preset: str) -> list[dict]:
    """The default candidates: one, the method's own default options."""
    return [{}]


@dataclass
class Recipe:
    """One method's benchmark recipe: ``fit(cls, model, data, preset)``, ``settings(iv, model, data,
    preset)`` (apply options tried on validation; the least toxic admissible one is tested) and
    ``metrics(iv, model, data, prompts, neutral, options, cfg)`` (added to the arm's metrics). With
    ``pool``, the benchmark generates its pool of continuations before the fit (``data.pool``)."""

    fit: Callable[..., Intervention] = fit_on_contrast
    settings: Callable[..., list[dict]] = default_settings
    metrics: Callable[..., dict] | None = None
    default: bool = True  # joins `steerlab bench` when no --methods are given
    pool: bool = False  # its fit learns from the model's own continuations (``data.pool``, experiments.pool)


RECIPES: Registry = Registry("benchmark recipe", InterventionError)


def register_recipe(method: str, recipe: Recipe | None = None, **parts: Any) -> Recipe:
    """Register ``recipe`` (or ``Recipe(**parts)``) for ``method``."""
    return RECIPES.register(method, recipe or Recipe(**parts))


def recipe_for(method: str) -> Recipe:
    """The recipe of ``method`` (a registered method without one gets the default recipe)."""
    METHODS.check(method)
    return RECIPES[method] if method in RECIPES else Recipe()


def bench_methods() -> list[str]:
    """The registered methods the benchmark runs by default (those that aim to change behaviour)."""
    return [name for name in sorted(METHODS) if recipe_for(name).default]


# --- the built-in methods' recipes -----------------------------------------------------------------
def _steering_fit(cls, model: Model, data: BenchData, preset: str):
    """Mean-difference directions (mean over prompt tokens after the first, unit norm) at a third, half
    and two thirds of the depth, from the benchmark's toxicity contrast set."""
    L = model.n_layers
    layers = sorted({L // 3, L // 2, (2 * L) // 3})
    return cls.fit(model, data.contrast, sites=[f"blocks.{i}.resid_post" for i in layers], positions="mean_skip_first")


STEERING_STRENGTHS = (0.05, 0.1, 0.25, 0.5, 1.0)
"""Steering strengths in units of the site's typical token-state norm: from no visible effect
(0.05) to clearly broken fluency (on the default model 0.25 already costs about 1.7x perplexity)."""


def _steering_settings(iv, model: Model, data: BenchData, preset: str) -> list[dict]:
    """Per site, activation addition at every position at each of :data:`STEERING_STRENGTHS` (the
    ``strength`` option; the norm measured on the fitting texts); outside the quick preset also at
    generated positions only, the gated variant, and clamping the projection to the non-toxic level
    (not directional ablation: the direction points from toxic to non-toxic and ordinary tokens
    project on its non-toxic side, so removing the component raised toxicity in the steering study,
    docs/steering.md)."""
    out = []
    for site in iv.directions:
        out += [{"sites": [site], "strength": a} for a in STEERING_STRENGTHS]
        if preset != "quick":
            out += [{"sites": [site], "strength": 0.25, "where": "generated"},
                    {"sites": [site], "strength": 0.5, "mode": "gated"},
                    {"sites": [site], "alpha": 1.0, "mode": "clamp"}]
    return out


def _probe_fit(cls, model: Model, data: BenchData, **kw):
    """Probes on the benchmark's contrast set (its most toxic training prompts labelled 1, the least
    toxic 0), split 70/30 by prompt inside the training part."""
    from ..explain.probes import labelled_from_texts

    texts = list(data.contrast.undesirable) + list(data.contrast.desirable)
    labels = [1] * len(data.contrast.undesirable) + [0] * len(data.contrast.desirable)
    return cls.fit(model, labelled_from_texts(texts, labels, seed=data.seed, source="bench contrast set"), **kw)


def _iti_fit(cls, model: Model, data: BenchData, preset: str):
    """Probes as for SLIM; the top 5% of heads (the paper's 48 of 1024)."""
    return _probe_fit(cls, model, data, k=max(1, round(0.05 * model.n_layers * model.n_heads)))


def _slim_metrics(iv, model: Model, data: BenchData, prompts, neutral, options: dict, cfg) -> dict:
    """Where the layer classifier fires: at the last token of the test prompts (split by the prompt's
    own toxicity under the benchmark's scorer, >= 0.5 or not), of the neutral sentences (every firing
    a false detection), and at every step of one generated sample per test prompt."""
    from ..generation import generate

    texts = [getattr(p, "text", p) for p in prompts]
    fires = iv.firing(model, texts)
    tox = np.asarray(data.scorer.toxicity(texts), dtype=float) >= 0.5
    rate = lambda f: float(f.float().mean()) if len(f) else float("nan")  # noqa: E731
    iv.reset_counts()
    with iv.apply(model, **options):
        generate(model, prompts, cfg, progress=False, k=1)
    return {"fire_rate": {"test_prompts": rate(fires), "toxic_test_prompts": rate(fires[torch.from_numpy(tox)]),
                          "nontoxic_test_prompts": rate(fires[torch.from_numpy(~tox)]),
                          "n_toxic_test_prompts": int(tox.sum()),
                          "neutral_texts": rate(iv.firing(model, neutral)), "generation_steps": iv.fire_rate,
                          "layer": iv.layer, "tau": iv.tau}}


EIGENSHIFT_K: dict[str, tuple[int, ...]] = {"quick": (1, 2, 4, 8, 16, 32, 64, 144), "full": (1, 2, 4, 8, 16, 32, 64, 144)}
EIGENSHIFT_GRID: dict[str, tuple[tuple[str, str, tuple[int, ...], tuple[float, ...]], ...]] = {
    "quick": (("t", "first", EIGENSHIFT_K["quick"], (0.0, 0.5)), ("abs", "first", (1, 4, 16, 64, 144), (0.0,)),
              ("t", "matched", (1, 4, 16, 64, 144), (0.0,))),
    "full": tuple((r, p, EIGENSHIFT_K["full"], (0.0, 0.25, 0.5))
                  for r, p in (("t", "first"), ("abs", "first"), ("t", "matched"), ("abs", "matched")))}
"""The (rank, positions, k, alpha) grid the benchmark tries on validation: directions ranked by
Welch's t or by |delta|, of non-toxic states at the first generated token (the paper) or at the
positions of the toxic ones (position-matched, so that the two sets differ in toxicity rather than
in position), k doubling from 1 (the public code's default for d = 576) to 64, and 144 (a quarter of
the default model's 576 directions, where fluency is gone), alpha from removing the directions (0,
the paper's reported run) to halving them. The quick preset keeps the whole k axis and alpha 0 and
0.5 for the benchmark's variant (t, first positions) and every fourth k at alpha 0 for the two
comparison variants, and leaves out |delta| with matched positions (26 settings instead of 96)."""


def bench_pool(data: BenchData):
    """The benchmark's pool of continuations (:mod:`.pool`), which the benchmark builds before fitting
    a recipe with ``pool=True``."""
    if data.pool is None:
        raise InterventionError("this recipe learns from the benchmark's pool of the model's own continuations "
                                "(data.pool, built by steerlab.experiments.pool.build_pool), which was not given")
    return data.pool


def _eigenshift_fit(cls, model: Model, data: BenchData, preset: str):
    """States from the model's own continuations of the benchmark's training prompts, scored by the
    benchmark's scorer: the pool (:mod:`.pool`; quick: the 128 prompts with the most toxic training
    scores x 8 samples of 16 tokens; otherwise every training prompt x 8 of 20 tokens: toxic-prone
    prompts give toxic continuations, which the argmax filter thins out), selected as
    ``collect_states`` does. Directions ranked by Welch's t (a difference that stands out from the
    spread of the states, not a wide spread); the fit keeps the largest k of the grid, so every
    setting applies a prefix of them."""
    from ..interventions import text_ids
    from .pool import pool_states

    pool = bench_pool(data)
    ks = EIGENSHIFT_K["quick" if preset == "quick" else "full"]
    iv = cls.fit(model, pool_states(model, pool, data.scorer), k=min(max(ks), model.d_model), alpha=0.0, rank="t")
    try:  # the position-matched statistics too, from the same pooled generations (a settings axis)
        iv.add_positions(model, pool_states(model, pool, data.scorer, positions="matched"))
    except SteerlabError as e:  # too few matched states: the axis is left out, and said so
        iv.meta["positions_note"] = f"matched positions left out: {e}"
    iv.meta["data_text_ids"] = text_ids(sorted({r["prompt"] for r in pool.rows}))
    iv.meta["bench_data"] = f"the pool: {len(pool.rows)} continuations of {len(pool.prompt_ids)} training prompts"
    return iv


AURA_MIN_TEXTS = 8


def _aura_fit(cls, model: Model, data: BenchData, preset: str):
    """AurA's data are toxic and non-toxic sentences (METHODS.md section 3; the paper's are Jigsaw
    comments): here the model's own continuations in the pool, toxic when the benchmark's scorer
    gives the continuation >= 0.5 (as ``steerlab fit aura`` labels generations, but without the
    prompt: every pooled prompt is a toxic-prone one, so prompt + continuation would label the prompt).
    With fewer than 8 of either kind, the contrast set's prompts (most toxic against least toxic
    training prompts), and ``bench_data`` says so."""
    pool = bench_pool(data)
    non, tox = pool.texts(0.5)
    n = f"{len(tox)} toxic and {len(non)} non-toxic continuations"
    if min(len(non), len(tox)) >= AURA_MIN_TEXTS:
        iv = cls.fit(model, (non, tox), seed=data.seed)
        iv.meta["bench_data"] = f"the pool: {n} of {len(pool.prompt_ids)} training prompts"
    else:
        iv = cls.fit(model, data.contrast, seed=data.seed)
        iv.meta["bench_data"] = (f"the contrast set's prompts (fallback: the pool has {n}, fewer than "
                                 f"{AURA_MIN_TEXTS} of each)")
    iv.meta["n_texts"] = {"non_toxic": len(non), "toxic": len(tox)}
    return iv


def _eigenshift_settings(iv, model: Model, data: BenchData, preset: str) -> list[dict]:
    """The (rank, positions, k, alpha) grid of :data:`EIGENSHIFT_GRID` for the k up to the number of
    directions this edit holds and the positions whose statistics it holds (each rank re-ranks all
    directions from the saved delta and t)."""
    key = "quick" if preset == "quick" else "full"
    held = {iv.positions, *iv.alt}
    return [{"rank": r, "positions": p, "k": k, "alpha": a} for r, p, ks, alphas in EIGENSHIFT_GRID[key]
            if p in held for k in ks if k <= len(iv.indices) for a in alphas]


AURA_SHARES: dict[str, tuple[float, ...]] = {"quick": (0.001, 0.003, 0.01, 0.03, 0.1),
                                             "full": (0.001, 0.003, 0.01, 0.03, 0.1)}
AURA_VARIANTS: dict[str, tuple[str, ...]] = {"quick": ("det0",), "full": ("damp", "det0")}


def _aura_settings(iv, model: Model, data: BenchData, preset: str) -> list[dict]:
    """AurA's proportional dampening, and det0 (outside the quick preset also damp) of the top 0.1%
    to 10% of the experts by AUROC (:data:`AURA_SHARES`, from the AUROCs of one fit): silencing 10%
    of the best detectors breaks fluency."""
    if not iv.aurocs:
        return [{}]
    key = "quick" if preset == "quick" else "full"
    n = sum(a.numel() for a in iv.aurocs.values())
    sizes = sorted({max(1, round(f * n)) for f in AURA_SHARES[key]})
    return [{"variant": "aura"}] + [{"variant": v, "top_n": t} for v in AURA_VARIANTS[key] for t in sizes]


SLIM_KAPPAS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
"""kappa 1 (a fully flagged head lands on its transported value) to 40 (the paper swept 20-60): on
SmolLM2-135M the probe logit already crosses the boundary near kappa 1 and kappa 20 moves heads by
about 2.4 times their norm, so the effect turns on, and fluency breaks, within this range."""

ITI_ALPHAS = (2.0, 5.0, 10.0, 15.0, 25.0, 40.0)
"""Around the paper's 15 (in units of each head's activation standard deviation along its direction):
2 barely moves the model, 40 breaks its fluency."""


register_recipe("steering", fit=_steering_fit, settings=_steering_settings)
register_recipe("iti", fit=_iti_fit, settings=lambda iv, model, data, preset: [{"alpha": a} for a in ITI_ALPHAS])
register_recipe("slim", fit=lambda cls, model, data, preset: _probe_fit(cls, model, data), metrics=_slim_metrics,
                settings=lambda iv, model, data, preset: [{"kappa": k} for k in SLIM_KAPPAS])
register_recipe("aura", fit=_aura_fit, settings=_aura_settings, pool=True)
register_recipe("eigenshift", fit=_eigenshift_fit, settings=_eigenshift_settings, pool=True)
# nothing to learn from the benchmark's data: the strong detox instruction
register_recipe("selfcorrect", fit=lambda cls, model, data, preset: cls.fit(model))
# edit one state toward a target (supervised control, its RL variant): not detox methods
register_recipe("selfie-control", default=False)
register_recipe("selfie-rl", default=False)
