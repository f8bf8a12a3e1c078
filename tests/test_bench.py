"""The detoxification benchmark's orchestration on a tiny random model: every method runs or is
reported as failed, the table has every column, nothing from the test split is used before the
test, and a resumed run reaches the same numbers."""

import csv
import json

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab import interventions as I
from steerlab.data import load_prompts, split
from steerlab.experiments.bench import BenchError, make_config, run_bench
from steerlab.experiments.bench_report import table_rows

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def _cfg(**kw):
    base = dict(methods=["steering", "selfcorrect"], scorer="profanity", n_val=3, n_test=5, k=2, max_new_tokens=3,
                n_neutral=8)
    return make_config("quick", **{**base, **kw})


def test_bench_tiny_end_to_end_and_resume(tmp_path, llama):
    out = tmp_path / "bench"
    metrics = run_bench(llama, out, _cfg(), progress=False)
    arms = {a["method"]: a for a in metrics["arms"]}
    assert list(arms) == ["unsteered", "steering", "selfcorrect"]
    # the tiny model has no chat template: self-correction fails, is reported, and the rest completes
    assert arms["selfcorrect"]["status"] == "failed" and "no chat template" in arms["selfcorrect"]["reason"]
    st = arms["steering"]
    from steerlab.interventions import load
    sv = load(out / "fit" / "steering.safetensors", llama)
    # every fitted site x (2 strengths + generated-only + gated + clamp)
    assert st["status"] == "ok" and len(st["selection"]) == len(sv.directions) * 5
    chosen = st["settings"]
    admissible = [s for s in st["selection"] if s["admissible"]]
    for s in st["selection"]:  # admissible: the perplexity ratio's CI upper bound within the limit
        r = s["ppl_ratio"]
        assert r["lo"] <= r["value"] <= r["hi"] and (not s["admissible"] or r["hi"] <= 1.5)
        assert s["mean_toxicity_change"]["lo"] <= s["mean_toxicity_change"]["value"] <= s["mean_toxicity_change"]["hi"]
    if admissible:  # the one-SE rule picks an admissible setting
        assert chosen in admissible and "note" not in chosen
    # the comparison block: power, Holm-adjusted p-values, verdict
    assert metrics["power"]["n_test_prompts"] == 5 and set(metrics["holm"]) == {"steering"}
    # every preset's minimum detectable effect from this run's spread, scaled by sqrt(k / k_preset)
    from steerlab.experiments.bench_config import PRESETS
    from steerlab.metrics.compare import minimum_detectable_effect

    p = metrics["power"]
    if p["sd_per_prompt"] > 0:  # (the tiny model's profanity scores may not vary)
        assert set(p["by_preset"]) == set(PRESETS) and p["by_preset"]["full"]["k"] == 25
    for v in p.get("by_preset", {}).values():
        assert v["minimum_detectable_effect"] == pytest.approx(
            minimum_detectable_effect(p["sd_per_prompt"] * (2 / v["k"]) ** 0.5, v["n_test_prompts"]))
    assert metrics["verdict"] and any("steering" in v for v in metrics["verdict"])
    stages = {r["stage"]: r["seconds"] for r in metrics["profile"]}
    for name in ("fit: steering", "validation: steering", "test: steering", "test: unsteered", "scoring",
                 "perplexity", "side effects", "report"):
        assert stages.get(name, 0) > 0, name
    assert 0 < sum(r["share"] for r in metrics["profile"]) <= 1 + 5e-3  # exclusive times within the call's wall time
    assert json.loads((out / "record.json").read_text())["profile"] == metrics["profile"]
    # every test row generated its tokens in this call (and validation, timing and probes more)
    assert metrics["generation"]["generated_tokens"] >= 2 * 5 * 2 * 3
    assert json.loads((out / "record.json").read_text())["generation"] == metrics["generation"]
    # every column of the table, for every arm that ran
    rows = {r["method"]: r for r in table_rows(metrics)}
    for col in ("expected max toxicity [95% CI]", "toxicity probability [95% CI]", "mean toxicity [95% CI]",
                "Δ mean toxicity vs unsteered (paired 95% CI)", "perplexity", "neutral perplexity", "neutral KL",
                "distinct-2", "fit s", "generation time x", "settings"):
        assert col in rows["steering"] and col in rows["unsteered"], col
    assert rows["selfcorrect"]["status"] == "failed"
    assert set(arms["steering"]["mean_toxicity_by_category"]) <= {
        "flirtation", "identity_attack", "insult", "profanity", "severe_toxicity", "sexually_explicit", "threat"}
    # the paired difference of the baseline with itself is zero
    assert arms["unsteered"]["paired_difference"]["mean_toxicity"]["value"] == 0.0
    # no test prompt was used for fitting or selection
    parts = split(load_prompts("rtp"), seed=0)
    test_ids = {p.id for p in parts["test"]}
    test_texts = {p.text for p in parts["test"]}
    val_rows = [json.loads(x) for f in (out / "val").rglob("results.jsonl") for x in f.read_text().splitlines()]
    assert val_rows and not test_ids & {r["prompt_id"] for r in val_rows}
    assert sv.meta["n_desirable"] > 0
    assert json.loads((out / "record.json").read_text())["methods"] == ["steering", "selfcorrect"]
    test_rows = [json.loads(x) for x in (out / "test" / "steering" / "results.jsonl").read_text().splitlines()]
    assert {r["prompt_id"] for r in test_rows} <= test_ids and {r["prompt"] for r in test_rows} <= test_texts
    cats = arms["steering"]["mean_toxicity_by_category"]
    assert sum(c["n_prompts"] for c in cats.values()) == 5
    assert all(c["lo"] <= c["value"] <= c["hi"] for c in cats.values())
    csv_rows = list(csv.DictReader((out / "tables" / "results.csv").open()))
    st_csv = next(r for r in csv_rows if r["method"] == "steering")
    assert float(st_csv["mean_toxicity_change_low"]) <= float(st_csv["mean_toxicity_change"]) \
        <= float(st_csv["mean_toxicity_change_high"])
    for f in ("report.html", "figures/tradeoff.png", "figures/dose_response.png", "tables/results.csv"):
        assert (out / f).stat().st_size > 0, f
    # the terminal table fits a log file's 130 columns without cutting a number; settings listed under it
    from steerlab.cli.app import console
    from steerlab.cli.tables import print_bench

    with console.capture() as cap:
        print_bench("tiny", metrics)
    printed = cap.get()
    assert all(len(line) <= 130 for line in printed.splitlines()) and printed.count("[") == printed.count("]")
    assert f"steering: {rows['steering']['settings']}" in printed and "selfcorrect: " in printed
    html = (out / "report.html").read_text()
    assert "Detoxification benchmark" in html and "data:image/png;base64" in html and "failed" in html
    assert "Verdict" in html and html.index("Verdict") < html.index("Results: toxicity")
    assert ("Each preset with this spread" in html) == bool(p.get("by_preset"))
    # resume: lose half of an arm's rows; the rerun regenerates them and reaches the same numbers
    f = out / "test" / "steering" / "results.jsonl"
    f.write_text("\n".join(f.read_text().splitlines()[:4]) + "\n")
    again = run_bench(llama, out, _cfg(), progress=False)
    for a, b in zip(metrics["arms"], again["arms"]):
        assert a.get("toxicity") == b.get("toxicity") and a.get("paired_difference") == b.get("paired_difference")
        assert a.get("fluency") == b.get("fluency") and a.get("side_effects") == b.get("side_effects")
        assert a.get("selection") == b.get("selection")
    # ... and measures nothing again: the regenerated rows are the same texts, whose likelihoods, side
    # effects and candidates' KL were kept beside them
    stages = {r["stage"] for r in again["profile"]}
    assert not stages & {"perplexity", "side effects", "validation: neutral KL", "similarity"}, stages


def test_bench_runs_prompt_side_methods_on_a_chat_model(tmp_path):
    from tiny import tiny_model

    m = tiny_model("llama")
    m.tok.chat_template = TEMPLATE
    metrics = run_bench(m, tmp_path / "b", _cfg(methods=["selfcorrect"]), progress=False)
    arm = metrics["arms"][1]
    assert arm["method"] == "selfcorrect" and arm["status"] == "ok", arm
    assert arm["side_effects"]["kl_from_unedited"] == pytest.approx(0.0, abs=1e-6)  # the model is not changed


def test_bench_config_errors():
    with pytest.raises(BenchError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(Exception, match="unknown intervention method 'nope'"):
        make_config("quick", methods=["nope"]).validate()
    with pytest.raises(BenchError, match="unknown setting"):
        make_config("quick", colour=1)


def test_bench_every_weight_and_head_method_runs_or_fails_cleanly(tmp_path, llama):
    metrics = run_bench(llama, tmp_path / "b", _cfg(methods=["aura", "iti", "slim", "eigenshift"]), progress=False)
    arms = {a["method"]: a for a in metrics["arms"]}
    for name in ("aura", "iti", "slim"):
        assert arms[name]["status"] == "ok", arms[name]
        assert arms[name]["paired_difference"]["mean_toxicity"]["lo"] <= arms[name]["paired_difference"][
            "mean_toxicity"]["hi"]
    from steerlab.experiments.recipes import ITI_ALPHAS, SLIM_KAPPAS

    assert [s["setting"] for s in arms["iti"]["selection"]] == [{"alpha": a} for a in ITI_ALPHAS]
    assert [s["setting"] for s in arms["slim"]["selection"]] == [{"kappa": k} for k in SLIM_KAPPAS]
    # semantic shift: similarity of each continuation to the unsteered one, recomputed here
    from steerlab.metrics.text import semantic_similarity

    def read_jsonl(path):
        return [json.loads(line) for line in open(path) if line.strip()]

    base = {(r["prompt_id"], r["sample"]): r["continuation"] for r in read_jsonl(tmp_path / "b/test/unsteered/results.jsonl")}
    iti = read_jsonl(tmp_path / "b/test/iti/results.jsonl")
    per = semantic_similarity([base[(r["prompt_id"], r["sample"])] for r in iti], [r["continuation"] for r in iti])
    sim = arms["iti"]["similarity_to_unsteered"]
    assert sim["n_pairs"] == len(iti) and sim["similarity"]["lo"] <= sim["similarity"]["value"] <= sim["similarity"]["hi"]
    by = {}
    for r, v in zip(iti, per.per_pair):
        by.setdefault(r["prompt_id"], []).append(v)
    assert sim["similarity"]["value"] == pytest.approx(np.mean([np.mean(v) for v in by.values()]), abs=1e-6)
    # SLIM's firing rates: the detector recomputed from captured activations at the last prompt token
    fr = arms["slim"]["fire_rate"]
    iv = I.load(tmp_path / "b/fit/slim.safetensors", llama)
    site = f"blocks.{iv.layer}.attn.heads"
    test_texts = [r["prompt"] for r in read_jsonl(tmp_path / "b/test/unsteered/results.jsonl") if r["sample"] == 0]
    a = sl.capture(llama, test_texts, site, "last")[site]
    votes = ((torch.einsum("nhd,hd->nh", a, iv.params["w"]) + iv.params["b0"]) > 0).sum(-1) >= iv.tau
    assert fr["test_prompts"] == pytest.approx(float(votes.float().mean()))
    assert 0 <= fr["neutral_texts"] <= 1 and 0 <= fr["generation_steps"] <= 1 and fr["layer"] == iv.layer
    # a random tiny model writes no toxic text: EigenShift cannot collect toxic states and says so
    assert arms["eigenshift"]["status"] == "failed" and "toxic" in arms["eigenshift"]["reason"]
    # resumed: SLIM's firing rates and every similarity are read back, not measured again, and equal
    again = run_bench(llama, tmp_path / "b", _cfg(methods=["aura", "iti", "slim", "eigenshift"]), progress=False)
    stages = {r["stage"] for r in again["profile"]}
    assert not stages & {"similarity", "method metrics: slim", "perplexity", "side effects"}, stages
    back = {a["method"]: a for a in again["arms"]}
    assert back["slim"]["fire_rate"] == fr and back["iti"]["similarity_to_unsteered"] == sim


def test_bench_test_all_settings_reports_every_candidate_on_test(tmp_path, llama):
    import numpy as np

    from steerlab import interventions as I
    from steerlab.generation import GenConfig, generate

    out = tmp_path / "b"
    # matched costs inside the range of the tiny model's perplexity ratios (0.6-1.1), so some are reached
    cfg = _cfg(methods=["aura"], sampling="greedy", k=1, test_all_settings=True, matched_ppl=(0.7, 0.9, 5.0))
    metrics = run_bench(llama, out, cfg, progress=False)
    arm = {a["method"]: a for a in metrics["arms"]}["aura"]
    cands = arm["candidates_test"]
    # proportional, then det0 of the top 0.1-0.3%, 1%, 3% and 10% of the 384 experts
    assert [c["setting"] for c in cands] == [{"variant": "aura"}] + [{"variant": "det0", "top_n": t} for t in (1, 4, 12, 38)]
    assert sum(c["chosen"] for c in cands) == 1
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["setting"] == arm["settings"]["setting"] and chosen["toxicity"] == arm["toxicity"]
    # a candidate that was not chosen, by hand: the saved fit applied with its setting, plain generate
    i, other = next((i, c) for i, c in enumerate(cands) if not c["chosen"])
    rows = [json.loads(x) for x in (out / "test" / f"aura.setting-{i}" / "results.jsonl").read_text().splitlines()]
    test = split(load_prompts("rtp"), seed=0)["test"][:5]
    iv = I.load(out / "fit" / "aura.safetensors", llama)
    with iv.apply(llama, **other["setting"]):
        hand = generate(llama, [p.text for p in test], GenConfig(max_new_tokens=3, sampling="greedy", k=1))
    by = {(r["prompt_id"], r["sample"]): r["continuation"] for r in rows}
    assert [[by[(p.id, 0)]] for p in test] == hand
    base = [json.loads(x) for x in (out / "test" / "unsteered" / "results.jsonl").read_text().splitlines()]
    diff = np.mean([r["toxicity"] for r in rows]) - np.mean([r["toxicity"] for r in base])
    assert abs(other["paired_difference"]["mean_toxicity"]["value"] - diff) < 1e-9
    assert (out / "tables" / "candidates.csv").exists()
    assert "not used for the choice" in (out / "report.html").read_text()
    assert "At matched fluency" in (out / "report.html").read_text()
    # the matched read-outs are confirmed on the settings closest to each cost, reusing the tested candidates
    from steerlab.experiments.bench_verdict import matched_settings

    want = matched_settings(arm["selection"], cfg.matched_ppl)
    assert len(want) >= 1 and {float(c): t["index"] for c, t in arm["matched_test"].items()} == want
    for c, t in (arm.get("matched_test") or {}).items():
        assert t["paired_difference"] == cands[t["index"]]["paired_difference"]
        assert metrics["matched_test"][c]["aura"]["change"] == t["paired_difference"]["mean_toxicity"]
    assert {d.name for d in (out / "test").iterdir()} == {"unsteered", "aura"} | {
        f"aura.setting-{i}" for i, c in enumerate(cands) if not c["chosen"]}
    # every tested candidate has its paired perplexity ratio; the figures draw them beside validation
    assert all(c["ppl_ratio"]["lo"] <= c["ppl_ratio"]["value"] <= c["ppl_ratio"]["hi"] for c in cands)
    for f in ("figures/dose_response.png", "figures/dose_response_kl.png"):
        assert (out / f).stat().st_size > 0, f
    # each validation candidate's neutral KL, against KL computed by hand under that setting
    from steerlab.data import neutral_texts
    from steerlab.metrics.lm import kl_from_reference, next_token_logprobs

    texts = neutral_texts()[:min(cfg.n_neutral, cfg.n_neutral_val)]
    ref = next_token_logprobs(llama, texts, top_k=256)
    for sel in arm["selection"][:2]:
        with iv.apply(llama, **sel["setting"]):
            assert sel["neutral_kl"] == pytest.approx(float(kl_from_reference(llama, ref, texts).mean), rel=1e-5)
    assert arm["selection"][0]["expected_max_toxicity_change"]["value"] == pytest.approx(
        arm["selection"][0]["mean_toxicity_change"]["value"])  # one sample per validation prompt
    # the options are not part of the run's identity: the same directory resumes without them
    again = run_bench(llama, out, _cfg(methods=["aura"], sampling="greedy", k=1, matched_ppl=(0.7, 0.9, 5.0),
                                      confirm_matched=False), progress=False)
    assert {a["method"]: a for a in again["arms"]}["aura"]["toxicity"] == arm["toxicity"]


def test_generation_overhead_is_a_paired_alternating_timing(llama, monkeypatch):
    import time

    import steerlab.generation as G
    from steerlab.evaluation import generation_overhead

    plain, log = G.generate_batch, []

    SLOW = 0.5  # (0.2 s was less than the baseline's own time when a benchmark ran beside the suite)

    class Slow:  # an intervention whose generation costs 500 ms more than the model's (a few ms here)
        def generate(self, model, texts, cfg, keys, **options):
            log.append(("arm", len(texts), options))
            time.sleep(SLOW)
            return plain(model, texts, cfg, keys)

    def base(model, texts, cfg, keys=None):
        log.append(("base", len(texts), {}))
        return plain(model, texts, cfg, keys)

    monkeypatch.setattr(G, "generate_batch", base)
    cfg = G.GenConfig(max_new_tokens=2, batch_size=3, k=1)
    t = generation_overhead(llama, ["a b", "c d", "e f", "g h"], cfg, Slow(), {"alpha": 1.0}, reps=3)
    # one untimed warm-up, then pairs in alternating order; one batch of batch_size prompts
    assert [x[0] for x in log] == ["arm", "base", "arm", "arm", "base", "base", "arm"]
    assert {x[1] for x in log} == {3} and all(x[2] == {"alpha": 1.0} for x in log if x[0] == "arm")
    ratios = [a / b for a, b in zip(t["arm_seconds"], t["baseline_seconds"])]
    assert t["ratio"] == pytest.approx(float(np.median(ratios)), rel=1e-3) and t["ratio"] > 1
    assert min(t["arm_seconds"]) >= SLOW
    log.clear()
    aa = generation_overhead(llama, ["a b"], cfg, None, reps=2)  # A/A: both sides the plain model
    assert [x[0] for x in log] == ["base"] * 5 and len(aa["ratios"]) == 2
    log.clear()  # one batch is batch_size rows: batch_size // k prompts; no warm-up asked for
    pair = generation_overhead(llama, ["a b", "c d", "e f"], G.GenConfig(max_new_tokens=2, batch_size=4, k=2, sampling="t1.0"),
                               Slow(),
                               reps=1, warmup=0)
    assert [(x[0], x[1]) for x in log] == [("base", 2), ("arm", 2)] and pair["ratio"] == pair["ratios"][0]
    with pytest.raises(sl.EmptyInputError, match="reps >= 1"):
        generation_overhead(llama, ["a"], cfg, None, reps=0)


def test_report_examples_pick_the_prompts_where_arms_differ_and_name_scorer_errors():
    from types import SimpleNamespace

    from steerlab.experiments.bench_report import differing_prompts, scorer_weaknesses
    from steerlab.scoring import get_scorer

    test = [SimpleNamespace(id=f"p{i}") for i in range(4)]
    tox = {"unsteered": [0.5, 0.9, 0.1, 0.4], "a": [0.5, 0.1, 0.1, 0.3], "b": [0.4, 0.8, 0.6, 0.4]}
    rows = {m: [{"prompt_id": f"p{i}", "sample": 0, "toxicity": t} for i, t in enumerate(v)] for m, v in tox.items()}
    # spreads: p0 0.1, p1 0.8, p2 0.5, p3 0.1
    assert [p.id for p in differing_prompts(rows, test, 2)] == ["p1", "p2"]
    flagged = dict(scorer_weaknesses(get_scorer("default")))
    assert "mouth" in flagged and flagged["mouth"] >= 0.5 and "woman" not in flagged
    # the examples: a table per prompt with a row per method and a column per sample (fits a narrow
    # window however many methods), the words the scorer flags on their own marked
    from steerlab.experiments.bench_report import _examples
    from steerlab.experiments.bench_verdict import fmt_p

    test = [SimpleNamespace(id=f"p{i}", text=f"prompt {i}") for i in range(4)]
    for m in rows:
        for r in rows[m]:
            r["continuation"] = "you idiot" if r["toxicity"] > 0.5 else "a quiet day"
    page = _examples(rows, test, get_scorer("default"), n=2, samples=1)
    assert page.count("<table>") == 2 and page.count("<tr>") == 2 * (1 + 3)
    assert page.index("prompt 1") < page.index("prompt 2") and "prompt 0" not in page
    assert "<mark>idiot</mark>" in page and "<mark>quiet</mark>" not in page and "sample 0" in page
    assert [fmt_p(p) for p in (0.00999, 0.0659, 1.0, 0.0004)] == ["0.01", "0.066", "1", "< 0.001"]


def test_log_axis_ticks_cover_the_range_with_plain_values():
    """The report's log axes: 1-2-5-like values from end to end, never more than 7, at least 3 (evenly
    spaced over a narrow range), the numbers a reader can place a point by."""
    from steerlab.experiments.bench_report import log_tick_values

    assert log_tick_values(0.7, 120) == [1, 2, 5, 10, 20, 50, 100]
    assert log_tick_values(21, 190) == [30, 50, 70, 100, 150]  # the tradeoff figure of the quick run
    assert log_tick_values(1e-4, 10) == [1e-4, 1e-3, 1e-2, 0.1, 1, 10]
    assert log_tick_values(0.95, 1.4) == [1.0, 1.1, 1.2, 1.3, 1.4]
    for lo, hi in ((0.5, 2), (20, 30), (0.9, 1.05), (3, 5000)):
        ticks = log_tick_values(lo, hi)
        assert 3 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks), (lo, hi)
