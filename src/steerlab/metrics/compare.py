"""Comparing methods honestly: multiplicity, power, monotone dose-response curves, and the
reading of a curve at a matched cost. Pure numpy (scipy only for normal quantiles).

- :func:`holm`: Holm's step-down adjustment of a family of p-values.
- :func:`minimum_detectable_effect` / :func:`prompts_needed`: what a paired design of ``n`` prompts
  can detect (normal approximation, two-sided test) given the per-prompt spread of the difference.
- :func:`isotonic`: the pool-adjacent-violators fit of a monotone curve (weighted least squares).
- :func:`matched_readout`: a method's effect at a given cost (for example a perplexity ratio of
  1.25), read from monotone fits of cost and effect along its strength axis.
- :func:`paired_perplexity_ratio`: the ratio of two arms' perplexities on the same prompts with a
  paired bootstrap CI over prompts.
- :func:`choose_setting`: the one-standard-error rule on the smoothed curve among the settings
  whose cost CI stays within the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ShapeError
from .stats import Estimate, resample_indices


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the input order: sort ascending, multiply the i-th smallest
    (0-based) by ``m - i``, take the running maximum and cap at 1. Controls the family-wise error
    rate at any level without assuming independence."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ShapeError(f"holm needs a 1-d list of p-values in [0, 1], got {pvalues!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def _z(alpha: float, power: float) -> float:
    from scipy.stats import norm

    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ShapeError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired difference that a two-sided test at level ``alpha`` detects with
    probability ``power`` on ``n`` prompts, when per-prompt differences have standard deviation
    ``sd``: ``(z_{1-alpha/2} + z_power) * sd / sqrt(n)``."""
    if n < 2 or not np.isfinite(sd) or sd < 0:
        raise ShapeError(f"minimum_detectable_effect needs n >= 2 and a finite sd >= 0, got n={n}, sd={sd}")
    return _z(alpha, power) * sd / np.sqrt(n)


def prompts_needed(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """How many paired prompts detect a true difference of ``effect`` (the inverse of
    :func:`minimum_detectable_effect`)."""
    if not effect > 0 or not np.isfinite(sd) or sd < 0:
        raise ShapeError(f"prompts_needed needs effect > 0 and a finite sd >= 0, got {effect}, {sd}")
    return max(2, int(np.ceil((_z(alpha, power) * sd / effect) ** 2)))


def isotonic(y: Sequence[float], weights: Sequence[float] | None = None, increasing: bool = True) -> np.ndarray:
    """Weighted least-squares monotone fit of ``y`` in its given order (pool adjacent violators)."""
    v = np.asarray(y, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or w.shape != v.shape or np.any(~np.isfinite(v)) or np.any(w <= 0):
        raise ShapeError(f"isotonic needs a non-empty finite 1-d curve and positive weights of the same "
                         f"length, got {v.shape} values and {w.shape} weights")
    sign = 1.0 if increasing else -1.0
    means, wsum, count = [], [], []
    for value, weight in zip(sign * v, w, strict=True):
        means.append(value), wsum.append(weight), count.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, c2 = means.pop(), wsum.pop(), count.pop()
            total = wsum[-1] + w2
            means[-1] = (means[-1] * wsum[-1] + m2 * w2) / total
            wsum[-1], count[-1] = total, count[-1] + c2
    return sign * np.repeat(means, count)


@dataclass(frozen=True)
class Readout:
    """A curve read at a matched cost: ``position`` is a fractional index along the strength axis
    (``None`` when the method never reaches the cost), ``effect`` the smoothed effect there (at the
    strongest setting when the cost is never reached), ``nearest`` the candidate whose smoothed cost
    is closest to the target (the one to confirm on test)."""

    target: float
    reached: bool
    position: float | None
    effect: float
    nearest: int

    def to_dict(self) -> dict:
        return {"target": self.target, "reached": self.reached, "position": self.position,
                "effect": self.effect, "nearest": self.nearest}


def matched_readout(cost: Sequence[float], effect: Sequence[float], target: float,
                    weights: Sequence[float] | None = None) -> Readout:
    """Read a method's ``effect`` (for example the change in mean toxicity) at ``cost == target``
    (for example a perplexity ratio of 1.25) along its strength axis. Candidates come in the order
    of increasing strength; cost is fitted increasing and effect decreasing (more strength, more
    reduction), so one noisy candidate cannot decide. The crossing of the fitted cost with the
    target is interpolated linearly between neighbouring candidates, and the fitted effect is
    interpolated at the same place."""
    c = isotonic(cost, weights, increasing=True)
    e = isotonic(effect, weights, increasing=False)
    if c.shape != e.shape:
        raise ShapeError(f"cost and effect need one value per candidate, got {c.size} and {e.size}")
    nearest = int(np.argmin(np.abs(c - target)))
    above = np.nonzero(c >= target)[0]
    if above.size == 0:
        return Readout(float(target), False, None, float(e[-1]), nearest)
    i = int(above[0])
    if i == 0 or c[i] == c[i - 1]:
        pos = float(i)
    else:
        pos = i - 1 + float((target - c[i - 1]) / (c[i] - c[i - 1]))
    lo = int(np.floor(pos))
    frac = pos - lo
    val = e[lo] if frac == 0 else e[lo] + frac * (e[lo + 1] - e[lo])
    return Readout(float(target), True, pos, float(val), nearest)


def choose_setting(effect: Sequence[float], se: Sequence[float], cost_high: Sequence[float],
                   limit: float) -> int | None:
    """The one-standard-error rule on the smoothed curve: among the candidates (in order of
    increasing strength) whose cost CI upper bound is within ``limit``, fit the effect decreasing,
    find the best fitted value and return the weakest admissible candidate whose fitted effect is
    within one standard error of it. ``None`` when no candidate is admissible."""
    e, s, hi = (np.asarray(a, dtype=np.float64) for a in (effect, se, cost_high))
    if not e.shape == s.shape == hi.shape or e.ndim != 1:
        raise ShapeError(f"effect, se and cost_high need one value per candidate, got {e.shape}, {s.shape}, {hi.shape}")
    ok = np.nonzero(hi <= limit)[0]
    if ok.size == 0:
        return None
    fitted = isotonic(e[ok], increasing=False)
    best = int(np.argmin(fitted))
    within = np.nonzero(fitted <= fitted[best] + s[ok][best])[0]
    return int(ok[within[0]])


def paired_perplexity_ratio(reference: dict[str, Sequence[float]], treated: dict[str, Sequence[float]],
                            n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> Estimate:
    """``perplexity(treated) / perplexity(reference)`` (token-weighted, as
    :class:`steerlab.metrics.lm.Perplexity` aggregates) with a paired percentile-bootstrap CI over
    the prompts both arms share. Each argument maps a prompt id to ``(summed NLL in nats, scored
    tokens)`` of its continuations (:func:`steerlab.evaluation.summarize` keeps them as
    ``fluency["by_prompt"]``)."""
    ids = [i for i in reference if i in treated]
    if len(ids) < 2:
        raise ShapeError(f"a perplexity ratio needs at least 2 shared prompts, got {len(ids)}")
    a = np.asarray([reference[i] for i in ids], dtype=np.float64).T
    b = np.asarray([treated[i] for i in ids], dtype=np.float64).T
    if a.shape[0] != 2 or b.shape[0] != 2 or not (a[1].sum() > 0 and b[1].sum() > 0):
        raise ShapeError("perplexity by prompt must be (NLL, tokens) pairs with scored tokens in both arms")
    point = float(np.exp(b[0].sum() / b[1].sum() - a[0].sum() / a[1].sum()))
    stats = np.empty(n_boot)
    for start, idx in resample_indices(len(ids), n_boot, seed):
        stats[start:start + len(idx)] = np.exp(b[0][idx].sum(-1) / b[1][idx].sum(-1)
                                               - a[0][idx].sum(-1) / a[1][idx].sum(-1))
    lo, hi = np.quantile(stats, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return Estimate(point, float(lo), float(hi))
