"""metrics.compare against hand computations, sklearn and textbook formulas."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.isotonic import IsotonicRegression

from steerlab.errors import ShapeError
from steerlab.metrics.compare import (
    choose_setting,
    holm,
    isotonic,
    matched_readout,
    minimum_detectable_effect,
    paired_perplexity_ratio,
    prompts_needed,
)
from steerlab.metrics.stats import bootstrap_p, paired_difference


def test_holm_by_hand():
    # sorted p: 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running max
    adjusted = holm([0.03, 0.01, 0.04, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.04, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    assert holm([0.2]).tolist() == [0.2]
    for bad in ([0.1, np.nan], [1.5], [[0.1]]):
        with pytest.raises(ShapeError, match="p-values"):
            holm(bad)


def test_bootstrap_p_tails():
    rng = np.random.default_rng(0)
    assert bootstrap_p(rng.normal(-5, 1, 999)) == pytest.approx(2 / 1000)
    centred = bootstrap_p(rng.normal(0, 1, 9999))
    assert centred > 0.8
    with pytest.raises(ShapeError, match="replicate"):
        bootstrap_p([])


def test_mde_and_sample_size_are_inverse():
    z = norm.ppf(0.975) + norm.ppf(0.8)  # 2.8016
    assert minimum_detectable_effect(0.3, 100) == pytest.approx(z * 0.03)
    n = prompts_needed(0.3, 0.03)
    assert n == int(np.ceil((z * 10) ** 2)) == 785
    assert minimum_detectable_effect(0.3, n) <= 0.03 < minimum_detectable_effect(0.3, n - 1)
    with pytest.raises(ShapeError, match="n >= 2"):
        minimum_detectable_effect(0.3, 1)
    with pytest.raises(ShapeError, match="effect > 0"):
        prompts_needed(0.3, 0.0)


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_matches_sklearn(increasing):
    rng = np.random.default_rng(1)
    y, w = rng.normal(size=40).cumsum(), rng.uniform(0.5, 2, 40)
    ours = isotonic(y, w, increasing=increasing)
    ref = IsotonicRegression(increasing=increasing).fit_transform(np.arange(40), y, sample_weight=w)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    np.testing.assert_allclose(isotonic([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    with pytest.raises(ShapeError, match="non-empty finite"):
        isotonic([])


def test_matched_readout_by_hand():
    # cost 1.0, 1.1, 1.4 (noisy 1.05 pooled with 1.1 below), effect 0, -0.02, -0.01, -0.08
    cost = [1.0, 1.1, 1.05, 1.4]
    effect = [0.0, -0.02, -0.01, -0.08]
    r = matched_readout(cost, effect, target=1.25)
    # fitted cost: 1.0, 1.075, 1.075, 1.4 -> crossing between index 2 and 3 at 2 + 0.175/0.325
    pos = 2 + (1.25 - 1.075) / (1.4 - 1.075)
    assert r.reached and r.position == pytest.approx(pos)
    # fitted effect: 0, -0.015, -0.015, -0.08 -> -0.015 + frac * (-0.065)
    assert r.effect == pytest.approx(-0.015 + (pos - 2) * -0.065)
    assert r.nearest == 3  # |1.4 - 1.25| = 0.15 < |1.075 - 1.25| = 0.175
    never = matched_readout([1.0, 1.01, 1.02], [0.0, -0.01, -0.02], target=1.25)
    assert not never.reached and never.position is None and never.effect == pytest.approx(-0.02)
    first = matched_readout([1.3, 1.5], [-0.1, -0.2], target=1.25)
    assert first.reached and first.position == 0 and first.effect == pytest.approx(-0.1)


def test_choose_setting_one_se_rule():
    effect = [-0.01, -0.05, -0.06, -0.09, -0.20]
    se = [0.02, 0.02, 0.02, 0.02, 0.02]
    high = [1.05, 1.1, 1.2, 1.4, 2.5]  # the last breaks fluency
    # admissible 0..3; fitted = effect (already decreasing); best -0.09 +- 0.02 -> first <= -0.07 is 3
    assert choose_setting(effect, se, high, limit=1.5) == 3
    wide = [0.05] * 5
    # best -0.09 + 0.05 = -0.04 -> the weakest within is index 1
    assert choose_setting(effect, wide, high, limit=1.5) == 1
    assert choose_setting(effect, se, high, limit=1.0) is None
    with pytest.raises(ShapeError, match="one value per candidate"):
        choose_setting([0.1], [0.1, 0.2], [1.0], 1.5)


def test_verdict_follows_the_numbers():
    from steerlab.experiments.bench_verdict import MethodResult, verdict

    a = MethodResult("ITI", (-0.085, -0.121, -0.049), 0.002, (1.12, 1.08, 1.17), {1.25: (-0.07, 1.4)}, kl=0.258)
    b = MethodResult("SLIM", (0.01, -0.02, 0.04), 0.5, (1.05, 1.02, 1.08), {1.25: (None, 1.1)})
    c = MethodResult("steering", (-0.045, -0.09, -0.006), 0.03, (1.68, 1.5, 1.9))
    first = verdict([a, b, c], mde=0.03, n_prompts=140, limit=1.5)
    text = " ".join(first)
    assert first[0].startswith("ITI lowers mean toxicity by 0.085") and first[0].endswith(
        "at perplexity x1.12 [1.08, 1.17] of the unsteered model and a neutral-text KL of 0.258 nats per token from it.")
    d = MethodResult("selfcorrect", (-0.06, -0.093, -0.024), 0.004, (7.28, 6.15, 8.9))  # significant, but broken
    assert verdict([d], 0.03, 124, 1.5)[0].endswith("x7.28 [6.15, 8.90] of the unsteered model, which breaks the "
                                                     "fluency rule (x1.5).")
    # steering's p = 0.03 is not significant after Holm (0.03 x 2 = 0.06)
    assert "steering lowers" not in text and "SLIM and steering: no change" in text
    assert "steering breaks the fluency rule on test" in text and "0.030 in mean toxicity" in text
    assert "ITI -0.070" in text and "SLIM (strongest setting x1.10)" in text
    # a second result set: nothing significant, a different verdict
    a2 = MethodResult("ITI", (-0.01, -0.05, 0.03), 0.6, (1.12, 1.08, 1.17))
    second = verdict([a2, b], mde=0.05, n_prompts=40, limit=1.5)
    assert second != first and second[0].startswith("No method lowers mean toxicity")
    assert "ITI and SLIM: no change" in second[1] and "0.050" in second[1]
    assert verdict([], 0.03, 10, 1.5)[0].startswith("No method arm finished")
    assert "power cannot be estimated" in verdict([a2], float("nan"), 40, 1.5)[1]


def test_paired_perplexity_ratio_by_hand():
    ref = {"a": (2.0, 2), "b": (6.0, 3), "c": (1.0, 1)}      # mean NLL 9/6 = 1.5
    arm = {"a": (4.0, 2), "b": (9.0, 3), "c": (2.0, 1), "z": (9.0, 1)}  # shared: 15/6 = 2.5
    r = paired_perplexity_ratio(ref, arm, n_boot=500)
    assert r.value == pytest.approx(np.exp(1.0))
    assert r.lo <= r.value <= r.hi
    same = paired_perplexity_ratio(ref, ref, n_boot=200)
    assert same.value == same.lo == same.hi == pytest.approx(1.0)
    with pytest.raises(ShapeError, match="at least 2 shared prompts"):
        paired_perplexity_ratio(ref, {"a": (1.0, 1)})


def test_paired_difference_two_sided_p_and_spread():
    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, (60, 2))
    lower = np.clip(base - 0.3, 0, 1)
    d = paired_difference(base, lower, n_boot=400)
    assert d.p_two_sided["mean_toxicity"] == pytest.approx(2 / 401)
    per_prompt = lower.mean(1) - base.mean(1)
    assert d.sd_per_prompt == pytest.approx(per_prompt.std(ddof=1))
    null = paired_difference(base, base[rng.permutation(60)], n_boot=400)
    assert null.p_two_sided["mean_toxicity"] > 0.05


def test_profiler_exclusive_times_add_up():
    from steerlab.profile import Profiler

    now = [0.0]
    p = Profiler(clock=lambda: now[0])
    with p.stage("outer"):
        now[0] += 2.0
        with p.stage("inner"):
            now[0] += 3.0
        with p.stage("inner"):
            now[0] += 1.0
    rows = {r["stage"]: r for r in p.table()}
    assert rows["inner"]["seconds"] == 4.0 and rows["outer"]["seconds"] == 2.0  # outer: its own time only
    assert rows["inner"]["share"] == pytest.approx(4 / 6, abs=1e-4) and list(rows) == ["inner", "outer"]
    assert {r["stage"]: r["share"] for r in p.table(total=12.0)}["outer"] == pytest.approx(2 / 12, abs=1e-4)
    with pytest.raises(ValueError):
        with p.stage("failing"):
            now[0] += 0.5
            raise ValueError("boom")
    assert {r["stage"]: r["seconds"] for r in p.table()}["failing"] == 0.5  # timed even when the block raises


def test_matched_settings_and_their_test_confirmation_by_hand():
    from steerlab.experiments.bench_verdict import matched_settings, matched_test

    def sel(ppl, change):
        return {"ppl_ratio": {"value": ppl}, "mean_toxicity_change": {"value": change}}

    # listed out of cost order on purpose: indices refer to the list as given
    selection = [sel(1.40, -0.08), sel(1.02, 0.0), sel(1.12, -0.03), sel(1.24, -0.05), sel(float("nan"), 0.0)]
    # x1.1: fitted costs 1.02, 1.12, 1.24, 1.40 -> nearest 1.12 (index 2); x1.25: 1.24 (index 3);
    # x2: never reached -> no setting to test
    assert matched_settings(selection, (1.1, 1.25, 2.0)) == {1.1: 2, 1.25: 3}
    assert matched_settings(selection[:1], (1.1,)) == {}

    def tested(change, lo, hi, p):
        return {"setting": {"alpha": change}, "ppl_ratio": {"value": 1.1, "lo": 1.0, "hi": 1.2},
                "paired_difference": {"mean_toxicity": {"value": change, "lo": lo, "hi": hi},
                                      "p_two_sided": {"mean_toxicity": p}}}

    arms = [{"method": "a", "matched_test": {"1.1": tested(-0.05, -0.08, -0.02, 0.01)}},
            {"method": "b", "matched_test": {"1.1": tested(-0.02, -0.05, 0.01, 0.04)}},
            {"method": "c"}]
    got = matched_test(arms)
    # Holm over the two methods that reach x1.1: 0.01 x 2 = 0.02, max(0.04 x 1, 0.02) = 0.04
    assert got["1.1"]["a"]["p_holm"] == pytest.approx(0.02) and got["1.1"]["b"]["p_holm"] == pytest.approx(0.04)
    assert got["1.1"]["a"]["significant"] and "c" not in got["1.1"]


def test_comparison_gives_every_presets_detectable_effect_from_the_runs_spread():
    """The report's power line: the run's minimum detectable effect, and each preset's from the same
    per-prompt spread scaled by sqrt(k_run / k_preset) (hand-checked: the quick preset is the run
    itself); the verdict carries each method's neutral-text KL."""
    from steerlab.experiments.bench_verdict import comparison
    from steerlab.metrics.compare import minimum_detectable_effect

    arm = {"method": "aura", "status": "ok", "side_effects": {"kl_from_unedited": 0.258},
           "paired_difference": {"mean_toxicity": {"value": -0.053, "lo": -0.082, "hi": -0.024},
                                 "p_two_sided": {"mean_toxicity": 0.002}, "sd_per_prompt": 0.114},
           "ppl_ratio": {"value": 0.97, "lo": 0.88, "hi": 1.06}}
    c = comparison([{"method": "unsteered", "status": "ok"}, arm], 124, 1.5,
                   presets={"quick": (124, 3), "full": (124, 25), "tiny": (1, 3)}, k=3)
    p = c["power"]
    assert p["minimum_detectable_effect"] == pytest.approx(2.8016 * 0.114 / 124 ** 0.5, rel=1e-3)
    assert p["by_preset"]["quick"]["minimum_detectable_effect"] == pytest.approx(p["minimum_detectable_effect"])
    assert p["by_preset"]["full"]["minimum_detectable_effect"] == pytest.approx(
        minimum_detectable_effect(0.114 * (3 / 25) ** 0.5, 124))
    assert "tiny" not in p["by_preset"]  # one prompt: nothing to estimate
    assert "a neutral-text KL of 0.258 nats per token" in c["verdict"][0]
    assert "by_preset" not in comparison([arm], 124, 1.5)["power"]
