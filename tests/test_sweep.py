"""Sweeps: per-row strengths in one batched generate equal separate runs; resume; heat map."""

import numpy as np
import pytest
import torch

from steerlab.generation import GenConfig, generate
from steerlab.steer import SteeringVector
from steerlab.steer.sweep import sweep, typical_norms

GOOD = ["what a lovely day", "thank you so much", "you are kind"]
BAD = ["you stupid idiot", "I hate all of you", "shut up loser"]
PROMPTS = ["the cat sat", "my friend said", "once upon a time", "hello"]


class BangScorer:
    """A real (trivial) scorer: share of characters that are '!' or '?'."""

    name, attributes = "bang", ["bang"]

    def toxicity(self, texts):
        return np.array([sum(ch in "!?" for ch in t) / max(1, len(t)) for t in texts])


def test_sweep_rows_equal_separate_steered_runs(tmp_path, llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, ["blocks.0.resid_post", "blocks.1.resid_post"])
    cfg = GenConfig(max_new_tokens=6, batch_size=5)
    alphas = [-2.0, 0.0, 1.0, 3.0]
    res = sweep(llama, sv, PROMPTS, alphas, BangScorer(), tmp_path / "sw", cfg, progress=False)
    norms = typical_norms(llama, PROMPTS, list(sv.directions))
    for site in sv.directions:
        for a in (-2.0, 3.0):
            with sv.only(site).apply(llama, alpha=a * norms[site]):
                ref = generate(llama, PROMPTS, cfg)
            got = {r["prompt"]: r["continuation"] for r in res.rows if r["site"] == site and r["alpha"] == a}
            assert [got[p] for p in PROMPTS] == [c[0] for c in ref], (site, a)
    base = {r["prompt"]: r["continuation"] for r in res.rows if r["site"] == "none"}
    assert [base[p] for p in PROMPTS] == [c[0] for c in generate(llama, PROMPTS, cfg)]
    # the table: alpha 0 column is the baseline, other cells the mean of their rows
    j = alphas.index(0.0)
    assert np.allclose(res.toxicity[:, j], res.baseline_toxicity)
    cell = [r["toxicity"] for r in res.rows if r["site"] == "blocks.1.resid_post" and r["alpha"] == 3.0]
    assert res.toxicity[1, alphas.index(3.0)] == pytest.approx(np.mean(cell))
    assert res.toxicity.shape == (2, 4) and np.isfinite(res.perplexity).all()
    # each cell's perplexity (all cells in one shared-prefix pass) equals the cell's rows scored alone
    from steerlab.metrics import perplexity
    rs = [r for r in res.rows if (r["site"], r["alpha"]) == ("blocks.0.resid_post", -2.0) and r["continuation"].strip()]
    assert res.perplexity[0, 0] == pytest.approx(perplexity(
        llama, [r["continuation"] for r in rs], prompts=[r["prompt"] for r in rs]).aggregate, rel=1e-4)
    base_rows = [r for r in res.rows if r["site"] == "none" and r["continuation"].strip()]
    assert res.baseline_perplexity == pytest.approx(perplexity(
        llama, [r["continuation"] for r in base_rows], prompts=[r["prompt"] for r in base_rows]).aggregate, rel=1e-4)
    # resume: a rerun generates nothing new and returns the same rows
    n = (tmp_path / "sw" / "results.jsonl").read_text().count("\n")
    again = sweep(llama, sv, PROMPTS, alphas, BangScorer(), tmp_path / "sw", cfg, progress=False)
    assert (tmp_path / "sw" / "results.jsonl").read_text().count("\n") == n == 4 + 2 * 3 * 4
    assert np.array_equal(again.toxicity, res.toxicity)
    site, alpha = res.best(lower=True, max_ppl_ratio=None)
    assert alpha != 0 and res.toxicity[res.sites.index(site), alphas.index(alpha)] == np.nanmin(
        np.where(np.array(alphas) == 0, np.nan, res.toxicity))
    site, alpha = res.best(lower=True, max_ppl_ratio=None, sign=1)
    assert alpha > 0 and res.toxicity[res.sites.index(site), alphas.index(alpha)] == np.nanmin(
        res.toxicity[:, [alphas.index(1.0), alphas.index(3.0)]])
    with pytest.raises(Exception, match="no sweep cell satisfies"):
        res.best(max_ppl_ratio=1e-9)
    png = res.heatmap(tmp_path / "heat.png")
    assert png.stat().st_size > 10_000


def test_sweep_rejects_vector_of_other_model(tmp_path, llama):
    from tiny import tiny_model

    sv = SteeringVector.fit(tiny_model("llama", seed=5), GOOD, BAD, "blocks.0.resid_post")
    with pytest.raises(Exception, match="fingerprint"):
        sweep(llama, sv, PROMPTS, [1.0], BangScorer(), tmp_path / "x", progress=False)
    with pytest.raises(Exception, match="at least one strength"):
        sweep(llama, SteeringVector.fit(llama, GOOD, BAD, "blocks.0.resid_post"), PROMPTS, [], BangScorer(),
              tmp_path / "y", progress=False)
    assert torch.is_tensor(sv.directions["blocks.0.resid_post"])


def test_admissibility_rule_is_one_function_used_by_the_sweep():
    import numpy as np

    from steerlab.evaluation import admissible
    from steerlab.steer.sweep import SweepResult

    ppl = np.array([[10.0, 16.0, np.nan]])
    d2 = np.array([[0.9, 0.9, 0.9]])
    kl = np.array([[0.01, 0.01, 0.2]])
    # by hand: ppl <= 1.5 x 10, distinct-2 >= 0.8 x 1.0; a NaN setting fails, a NaN baseline skips the limit
    assert admissible(ppl, d2, 10.0, 1.0, 1.5, 0.8).tolist() == [[True, False, False]]
    assert admissible(ppl, d2, 10.0, 1.2, 1.5, 0.8).tolist() == [[False, False, False]]
    assert admissible(ppl, d2, float("nan"), 1.0, 1.5, 0.8).tolist() == [[True, True, True]]
    assert admissible(ppl, d2, 10.0, 1.0, None, None, kl, 0.05).tolist() == [[True, True, False]]
    r = SweepResult(["s"], [-1.0, 1.0, 2.0], {"s": 1.0}, np.zeros((1, 3)), ppl, 0.0, 10.0, [], d2, 1.0, kl=kl)
    want = admissible(ppl, d2, 10.0, 1.0, 1.5, 0.8, kl, 0.05) & (np.array([-1.0, 1.0, 2.0]) > 0)
    assert r.admissible(1.5, 0.8, sign=1, max_kl=0.05).tolist() == want.tolist()
