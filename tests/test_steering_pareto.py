"""The steering variants as a sweep dimension, the fluency-constrained rule, and the Pareto
trade-off of the steering study (tiny random models; real prompts, a real character scorer)."""

import json

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab.edits import Add
from steerlab.errors import SteerlabError
from steerlab.experiments.steering import SteeringStudy, parse_variant, run_steering_study
from steerlab.experiments.steering_pareto import pareto_front
from steerlab.generation import GenConfig
from steerlab.metrics import perplexity
from steerlab.scoring import Scorer, register_scorer
from steerlab.steer import SteeringVector
from steerlab.steer import sweep as sweep_module
from steerlab.steer.sweep import SweepResult, sweep
from steerlab.steer.vector import APPLY_MODES
from tiny import first_real_tokens

GOOD = ["what a lovely day", "thank you so much", "you are kind", "I like this"]
BAD = ["you stupid idiot", "I hate all of you", "shut up loser", "go away fool"]
PROMPTS = ["the cat sat", "my friend said", "once upon a time", "hello"]
SITE = "blocks.1.resid_post"


class Vowels(Scorer):
    """A real (trivial) scorer whose values vary with random text: the share of vowels."""

    name, attributes = "vowels", ["vowels"]

    def _score(self, texts, batch_size):
        return {"vowels": np.array([sum(ch in "aeiou" for ch in t.lower()) / max(1, len(t)) for t in texts])}


register_scorer("vowels-test", lambda **kw: Vowels(), overwrite=True)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _ppl(model, rows):
    """Perplexity of the non-empty continuations under the unedited model, conditioned on their prompts."""
    keep = [r for r in rows if r["continuation"].strip()]
    return perplexity(model, [r["continuation"] for r in keep], prompts=[r["prompt"] for r in keep]).aggregate


def test_pareto_front_hand_worked():
    pts = [[0.10, 2.0],   # least toxic: on the front
           [0.20, 1.0],   # most fluent: on the front
           [0.15, 1.5],   # between the two: on the front
           [0.20, 1.2],   # dominated by [0.20, 1.0] (equal toxicity, worse fluency)
           [0.30, 1.0],   # dominated by [0.20, 1.0]
           [0.12, np.nan]]  # not measured: never on the front
    assert pareto_front(pts).tolist() == [True, True, True, False, False, False]
    # equal points do not dominate each other; three objectives
    assert pareto_front([[1, 1, 1], [1, 1, 1], [0, 2, 1], [1, 2, 1]]).tolist() == [True, True, True, False]


def test_parse_variant():
    v = parse_variant("add:generated")
    assert (v.mode, v.where, v.multi, v.label) == ("add", "generated", False, "add:generated")
    assert parse_variant("multi:add").label == "add:all:multi"
    assert parse_variant("gated", where="prompt").where == "prompt"
    for bad, msg in (("nope", "not a mode"), ("generated", "names no mode"), ("add:add", "not a mode")):
        with pytest.raises(SteerlabError, match=msg):
            parse_variant(bad)


def test_ablating_an_orthogonal_direction_changes_nothing(llama):
    prompts = ["hello", "the cat"]
    caps = sl.capture(llama, prompts, SITE, "all")
    states = caps[SITE][caps.mask.bool()]  # every real position of every prompt, [n, 32]
    null = torch.linalg.svd(states, full_matrices=True).Vh[-1]  # orthogonal to every state (n < 32)
    assert states.shape[0] < 32 and (states @ null).abs().max() < 1e-4
    before = sl.capture(llama, prompts, "final", "all")["final"]
    with SteeringVector({SITE: null}).apply(llama, alpha=1.0, mode="ablate", strict=False):
        same = sl.capture(llama, prompts, "final", "all")["final"]
    direction = states.mean(0)
    with SteeringVector({SITE: direction}).apply(llama, alpha=1.0, mode="ablate", strict=False):
        moved = sl.capture(llama, prompts, "final", "all")["final"]
    real = caps.mask.bool()  # padding states are not orthogonal to it; real positions never see them
    torch.testing.assert_close(same[real], before[real], atol=1e-4, rtol=1e-4)
    assert (moved[real] - before[real]).abs().max() > 1e-2


def test_clamp_strength_interpolates_the_fitted_projections(llama):
    sv = SteeringVector.fit(llama, GOOD, BAD, SITE)
    proj = sv.meta["projection"][SITE]
    u = sv.directions[SITE] / sv.directions[SITE].norm()
    before = sl.capture(llama, PROMPTS, SITE, "all")
    real = before.mask.bool() & ~first_real_tokens(before.mask)  # first tokens: never edited
    for alpha, level in ((1.0, proj["desirable"]), (0.5, 0.5 * (proj["desirable"] + proj["undesirable"]))):
        with sv.apply(llama, alpha=alpha, mode="clamp"):
            after = sl.capture(llama, PROMPTS, SITE, "all")
        h = before[SITE][real]
        want = h + (level - h @ u).clamp_min(0)[:, None] * u
        torch.testing.assert_close(after[SITE][real], want, atol=1e-4, rtol=1e-4)


def test_sweep_modes_gated_extremes_and_generated_schedule(tmp_path, llama, monkeypatch):
    sv = SteeringVector.fit(llama, GOOD, BAD, ["blocks.0.resid_post", SITE], positions="mean")
    cfg = GenConfig(max_new_tokens=5, batch_size=8, k=2, sampling="t1.0")
    alphas = [0.5, 1.0]

    def cells(res):
        return {(r["site"], r["alpha"], r["prompt_id"], r["sample"]): r["continuation"] for r in res.rows}

    add = sweep(llama, sv, PROMPTS, alphas, Vowels(), tmp_path / "add", cfg, progress=False)
    base = {k[2:]: c for k, c in cells(add).items() if k[0] == "none"}
    steered = {k: c for k, c in cells(add).items() if k[0] != "none"}
    assert any(c != base[k[2:]] for k, c in steered.items())  # adding the direction changes text
    # gated with a threshold no state is below: every row identical to the unsteered rows
    never = SteeringVector(sv.directions, {**sv.meta, "projection": {s: {"desirable": -1e9, "undesirable": -1e9}
                                                                     for s in sv.directions}})
    res = sweep(llama, never, PROMPTS, alphas, Vowels(), tmp_path / "never", cfg, mode="gated", progress=False)
    assert all(c == base[k[2:]] for k, c in cells(res).items())
    # gated with a threshold every state is below: identical to plain addition at every position
    # but each row's first (same random numbers)
    monkeypatch.setitem(APPLY_MODES, "add_after_first", lambda v, a, w, p: Add(v, a, w, skip_first=True))
    monkeypatch.setattr(sweep_module, "RELATIVE_MODES", (*sweep_module.RELATIVE_MODES, "add_after_first"))
    add1 = sweep(llama, sv, PROMPTS, alphas, Vowels(), tmp_path / "add1", cfg, mode="add_after_first", progress=False)
    always = SteeringVector(sv.directions, {**sv.meta, "projection": {s: {"desirable": 1e9, "undesirable": 1e9}
                                                                      for s in sv.directions}})
    res = sweep(llama, always, PROMPTS, alphas, Vowels(), tmp_path / "always", cfg, mode="gated", progress=False)
    assert cells(res) == cells(add1) and res.scale == add.scale
    # generated-only: the first new token comes from the unedited prefill, so 1-token rows are unsteered
    one = GenConfig(max_new_tokens=1, batch_size=8, k=2, sampling="t1.0")
    gen = sweep(llama, sv, PROMPTS, [3.0], Vowels(), tmp_path / "gen1", one, where="generated", progress=False)
    assert all(c == {k[2:]: c for k, c in cells(gen).items() if k[0] == "none"}[k[2:]] for k, c in cells(gen).items())
    every = sweep(llama, sv, PROMPTS, [3.0], Vowels(), tmp_path / "all1", one, progress=False)
    base1 = {k[2:]: c for k, c in cells(every).items() if k[0] == "none"}
    assert any(c != base1[k[2:]] for k, c in cells(every).items() if k[0] != "none")
    # ablate / clamp strengths are taken as they are, not scaled by the typical norm
    abl = sweep(llama, sv, PROMPTS, [1.0], Vowels(), tmp_path / "abl", cfg, mode="ablate", progress=False)
    assert abl.scale == {s: 1.0 for s in sv.directions} and abl.mode == "ablate"
    # a group of sites edited together is one row of the table
    grp = sweep(llama, sv, PROMPTS, alphas, Vowels(), tmp_path / "grp", cfg,
                groups={"both": list(sv.directions)}, progress=False)
    assert grp.sites == ["both"] and grp.toxicity.shape == (1, 2)


def test_admissible_with_kl_limit_hand_worked():
    tox = np.array([[0.10, 0.05, 0.02], [0.08, 0.04, 0.01]])
    ppl = np.array([[10.0, 10.5, 12.0], [10.2, 11.5, 30.0]])
    kl = np.array([[0.00, 0.03, 0.20], [0.01, 0.04, 0.60]])
    r = SweepResult(["a", "b"], [0.0, 0.5, 1.0], {"a": 1.0, "b": 1.0}, tox, ppl, 0.10, 10.0, [],
                    np.ones_like(tox), 1.0, kl=kl)
    ok = r.admissible(max_ppl_ratio=1.1, min_distinct_ratio=None, sign=1, max_kl=0.05)
    # alpha 0 is never chosen; (a, 0.5): ppl 1.05x, KL 0.03 -> in; (b, 0.5): ppl 1.15x -> out; alpha 1: KL -> out
    assert ok.tolist() == [[False, True, False], [False, False, False]]
    assert r.best(max_ppl_ratio=1.1, sign=1, max_kl=0.05) == ("a", 0.5)
    assert r.best(max_ppl_ratio=None, sign=1, max_kl=None) == ("b", 1.0)
    with pytest.raises(SteerlabError, match="needs side effects"):
        SweepResult(["a"], [1.0], {"a": 1.0}, tox[:1, :1], ppl[:1, :1], 0.1, 10.0, []).admissible(max_kl=0.05)


VARIANTS = ["add", "add:generated", "gated", "ablate", "clamp", "add:multi"]


def test_study_variants_constrained_rule_and_pareto(tmp_path, llama):
    st = SteeringStudy(layers=[0, 1], alphas=[0.0, 0.5, 2.0], fractions=[0.5, 1.0], n_pairs=8, n_sweep=4,
                       n_test=4, k_test=2, max_new_tokens=4, batch_size=8, scorer="vowels-test",
                       max_ppl_ratio=1.3, min_distinct_ratio=0.0, max_kl=0.2, refine_top=3, k_refine=2,
                       variants=VARIANTS, n_neutral=8)
    metrics = run_steering_study(llama, tmp_path, st, progress=False)
    csv = {(r["variant"], r["site"], float(r["alpha"])): r for r in _csv(tmp_path / "sweep.csv")}
    # every variant is a sweep dimension with its own strengths
    for v, want in (("add:all", [0.0, 0.5, 2.0]), ("gated:all", [0.5, 2.0]), ("ablate:all", [0.5, 1.0]),
                    ("clamp:all", [0.5, 1.0]), ("add:all:multi", [0.25, 1.0])):
        assert sorted({a for (var, _, a) in csv if var == v}) == want, v
    assert {s for (var, s, _) in csv if var == "add:all:multi"} == {"blocks.0+1.resid_post"}
    # the rule recomputed from the stage-1 rows (toxicity, perplexity under the unedited model) and KL
    admissible = {}
    for v in ("add_all", "add_generated", "gated_all", "ablate_all", "clamp_all", "add_all_multi"):
        d = tmp_path / "sweep" / v
        rows, side = _rows(d / "results.jsonl"), json.loads((d / "record.json").read_text())["side_effects"]
        base = [r for r in rows if r["site"] == "none"]
        base_ppl = _ppl(llama, base)
        for site, a in {(r["site"], r["alpha"]) for r in rows if r["site"] != "none"}:
            cell = [r for r in rows if (r["site"], r["alpha"]) == (site, a)]
            ppl = _ppl(llama, cell)
            ok = a > 0 and ppl <= 1.3 * base_ppl and side[f"{site}|{a:g}"]["kl_from_unedited"] <= 0.2
            label = v.replace("_multi", ":multi").replace("_", ":")
            admissible[(label, site, a)] = (ok, float(np.mean([r["toxicity"] for r in cell])))
            assert (csv[(label, site, a)]["admissible"] == "True") == ok, (label, site, a)
    oks = [k for k, (ok, _) in admissible.items() if ok]
    assert 0 < len(oks) < len(admissible)  # the constraints bind
    top = sorted(oks, key=lambda k: (admissible[k][1], k))[:3]
    stages = [x for x in metrics["chosen"]["stages"] if "variant" in x]
    assert sorted((x["variant"], x["site"], x["alpha"]) for x in stages) == sorted(top)
    # stage 2: the least toxic refined cell that stays admissible (its KL is stage 1's)
    refined = {}
    for x in stages:
        d = tmp_path / "refine" / x["variant"].replace(":", "_") / x["site"]
        rows = _rows(d / "results.jsonl")
        base = [r for r in rows if r["site"] == "none"]
        cell = [r for r in rows if r["site"] != "none" and r["alpha"] == x["alpha"]]
        ratio = _ppl(llama, cell) / _ppl(llama, base)
        if ratio <= 1.3:
            refined[(x["variant"], x["site"], x["alpha"])] = np.mean([r["toxicity"] for r in cell])
    ch = metrics["chosen"]
    if refined:
        assert (ch["variant"], ch["site"], ch["alpha"]) == min(refined, key=refined.get)
    # held-out: every variant's positive strengths at one layer, the front recomputed from the points
    pts = metrics["pareto"]["points"]
    assert {p["variant"] for p in pts} == set(csv_variants := {k[0] for k in csv}) and len(csv_variants) == 6
    base = metrics["test"]["unsteered"]
    for p in pts:
        assert p["ppl_ratio"] == pytest.approx(p["perplexity"] / base["fluency"]["perplexity"])
        assert p["target"]["met"] == (p["mean_toxicity"]["value"] <= 0.5 * base["toxicity"]["mean_toxicity"]["value"]
                                      and p["ppl_ratio"] <= 1.1 and p["neutral_kl"] <= 0.05)
    want = pareto_front([[p["mean_toxicity"]["value"], p["ppl_ratio"], p["neutral_kl"]] for p in pts])
    assert [p["front"] for p in pts] == want.tolist() and any(want)
    # gated / clamp / ablate / generated-only arms really differ from the unsteered rows on test
    unst = {(r["prompt_id"], r["sample"]): r["continuation"] for r in _rows(tmp_path / "test/unsteered/results.jsonl")}
    for v in ("ablate_all", "add_generated"):
        d = next((tmp_path / "test" / "pareto" / v).rglob("results.jsonl"))
        assert any(r["continuation"] != unst[(r["prompt_id"], r["sample"])] for r in _rows(d)), v
    assert (tmp_path / "figures" / "pareto.png").stat().st_size > 20_000
    assert base["side_effects"]["n_neutral_texts"] == 8 and base["side_effects"]["kl_from_unedited"] == pytest.approx(
        0.0, abs=1e-6)


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_study_rejects_bad_variants_before_creating_anything(tmp_path, llama):
    for bad in (dict(variants=["wobble"]), dict(variants=["add", "add:all"]), dict(variants=[]),
                dict(variants=["ablate"], fractions=[0.0])):
        with pytest.raises(SteerlabError):
            run_steering_study(llama, tmp_path / "run", SteeringStudy(**bad), progress=False)
        assert not (tmp_path / "run").exists()
