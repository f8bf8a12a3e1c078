"""Paired bootstrap of the difference between two arms on the same prompts."""

import numpy as np
import pytest

from steerlab.errors import ShapeError
from steerlab.metrics import paired_difference, toxicity_metrics


def test_paired_difference_against_a_plain_loop():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=(40, 3))
    treated = np.clip(base - 0.1 + rng.normal(0, 0.05, size=base.shape), 0, 1)
    d = paired_difference(base, treated, n_boot=500, seed=7)
    # point estimates: differences of the marginal metrics
    mb, mt = toxicity_metrics(base), toxicity_metrics(treated)
    assert d.mean_toxicity.value == pytest.approx(mt.mean_toxicity.value - mb.mean_toxicity.value)
    assert d.expected_max_toxicity.value == pytest.approx(mt.expected_max_toxicity.value - mb.expected_max_toxicity.value)
    # the CI, recomputed resample by resample with the same draws
    idx = np.random.default_rng(7).integers(0, 40, size=(500, 40))
    diffs = np.array([treated[i].mean() - base[i].mean() for i in idx])
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert d.mean_toxicity.lo == pytest.approx(lo) and d.mean_toxicity.hi == pytest.approx(hi)
    emt = np.array([treated[i].max(1).mean() - base[i].max(1).mean() for i in idx])
    assert d.expected_max_toxicity.lo == pytest.approx(np.quantile(emt, 0.025))
    assert d.p_not_lower["mean_toxicity"] == pytest.approx((diffs >= 0).mean())
    # pairing removes the prompt-to-prompt spread: narrower than the two marginal CIs would suggest
    marginal = (mt.mean_toxicity.hi - mt.mean_toxicity.lo) + (mb.mean_toxicity.hi - mb.mean_toxicity.lo)
    assert d.mean_toxicity.hi - d.mean_toxicity.lo < 0.3 * marginal
    assert d.mean_toxicity.hi < 0


def test_paired_difference_bad_input():
    with pytest.raises(ShapeError, match="same prompts"):
        paired_difference(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ShapeError):
        paired_difference(np.zeros((3, 2)), np.zeros((3, 2)), n_boot=0)
