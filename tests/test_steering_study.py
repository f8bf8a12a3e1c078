"""The steering study end to end on a tiny model (real prompts, real scorer, tiny generations)."""

import json

import numpy as np
import pytest

from steerlab.data import ContrastSet
from steerlab.experiments.steering import SteeringStudy, run_steering_study
from steerlab.scoring import get_scorer
from steerlab.steer import SteeringVector


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_steering_study_tiny(tmp_path, llama):
    st = SteeringStudy(layers=[0, 1], alphas=[-1.0, 0.0, 0.5, 1.0, 2.0], n_pairs=8, n_sweep=4, n_test=6, k_test=2,
                       max_new_tokens=4, batch_size=8, scorer="profanity", max_ppl_ratio=50.0,
                       min_distinct_ratio=0.0, refine_top=3, k_refine=2, n_neutral=8)
    metrics = run_steering_study(llama, tmp_path, st, progress=False)
    for f in ("config.json", "metrics.json", "contrast.json", "vector.safetensors", "sweep.csv",
              "figures/sweep_add_all.png", "figures/test_toxicity.png", "figures/pareto.png", "pareto.csv"):
        assert (tmp_path / f).exists(), f
    cs = ContrastSet.load(tmp_path / "contrast.json")
    scorer = get_scorer("profanity")
    # the contrast pairs: every desirable prompt is less toxic than every undesirable one
    assert scorer.toxicity(cs.desirable).max() <= scorer.toxicity(cs.undesirable).min()
    sv = SteeringVector.load(tmp_path / "vector.safetensors", llama)
    assert set(sv.directions) == {"blocks.0.resid_post", "blocks.1.resid_post"}
    ch = metrics["chosen"]
    # the chosen cell is the least toxic admissible refined cell, recomputed from the stage-2 rows
    stage2 = {}
    for d in (tmp_path / "refine" / "add_all").iterdir():
        for r in _rows(d / "results.jsonl"):
            if r["site"] != "none":
                stage2.setdefault((r["site"], r["alpha"]), []).append(r["toxicity"])
    assert len(stage2) == 3 and all(a > 0 for _, a in stage2)
    want = min(stage2, key=lambda c: np.mean(stage2[c]))
    assert (ch["site"], ch["alpha"]) == want
    # the strength tested is the strength chosen: alpha x the typical norm measured on validation
    scale = json.loads((tmp_path / "sweep" / "add_all" / "record.json").read_text())["scale"][ch["site"]]
    assert ch["typical_norm"] == scale and ch["absolute_strength"] == pytest.approx(ch["alpha"] * scale)
    test = metrics["test"]
    assert list(test)[0] == "unsteered" and len(test) == 4
    base_rows = _rows(tmp_path / "test" / "unsteered" / "results.jsonl")
    for r in test.values():
        mt = r["toxicity"]["mean_toxicity"]
        assert mt["lo"] <= mt["value"] <= mt["hi"]
        assert r["toxicity"]["n_prompts"] == 6 and r["toxicity"]["k_samples"] == 2
        pd = r["paired_difference"]["mean_toxicity"]
        assert pd["value"] == pytest.approx(mt["value"] - test["unsteered"]["toxicity"]["mean_toxicity"]["value"])
        assert pd["lo"] <= pd["value"] <= pd["hi"]
    assert test["unsteered"]["paired_difference"]["mean_toxicity"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert len(base_rows) == 12
    assert test["unsteered"]["side_effects"]["kl_from_unedited"] == pytest.approx(0.0, abs=1e-6)
    assert test[list(test)[2]]["side_effects"]["kl_from_unedited"] > 0  # the negated vector changes the model
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["chosen"] == metrics["chosen"]


def test_steering_study_validates_before_creating_anything(tmp_path, llama):
    from steerlab.errors import SteerlabError

    for bad in (dict(scorer="nope"), dict(layers=[9]), dict(where="nowhere")):
        with pytest.raises(SteerlabError):
            run_steering_study(llama, tmp_path / "run", SteeringStudy(**bad), progress=False)
        assert not (tmp_path / "run").exists()


def test_side_effects_zero_without_edit_and_positive_with(llama):
    import torch

    from steerlab.evaluation import neutral_reference, side_effects
    from steerlab.metrics import perplexity

    # texts of different lengths (padding), one of them a single token (nothing to score)
    texts = ["a plain sentence about the weather.", "the train leaves at nine.", "ok"]
    ref = neutral_reference(llama, texts, top_k=None)  # exact distributions
    plain = side_effects(llama, ref, texts)
    assert plain["kl_from_unedited"] == pytest.approx(0.0, abs=1e-6) and plain["kl_coverage"] == 1.0
    assert plain["neutral_perplexity"] == pytest.approx(perplexity(llama, texts).aggregate)
    v = SteeringVector({"blocks.1.resid_post": torch.ones(32)})
    with v.apply(llama, alpha=2.0, strict=False):
        edited = side_effects(llama, ref, texts)
        # perplexity comes from the KL pass itself: equal to perplexity's own teacher-forced pass
        assert edited["neutral_perplexity"] == pytest.approx(perplexity(llama, texts).aggregate, rel=1e-5)
    assert edited["kl_from_unedited"] > 0.01
    assert edited["neutral_perplexity"] != pytest.approx(plain["neutral_perplexity"])
