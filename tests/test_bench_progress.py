"""What the benchmark shows while it works (one line per phase and method in a log, no carriage
return) and its cost column (alternating pairs added until the ratio's CI is narrow)."""

import time

import numpy as np
import pytest

import steerlab.generation as G
from steerlab.evaluation import generation_overhead, median_ci
from steerlab.experiments.bench import make_config, run_bench
from tiny import tiny_model

PROMPTS = [f"{w} number {i} says" for i, w in enumerate(["the cat", "a dog", "my friend", "this", "you"] * 8)]


def test_bench_log_has_one_line_per_phase_and_no_carriage_return(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STEERLAB_PROGRESS", "plain")
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    cfg = make_config("quick", methods=["aura", "iti"], scorer="profanity", prompts=str(f), n_val=3, n_test=5, k=2,
                      max_new_tokens=3, n_neutral=8)
    metrics = run_bench(tiny_model("llama"), tmp_path / "b", cfg, progress=True)
    log = capsys.readouterr().err
    assert "\r" not in log and "\x1b" not in log
    bench = [ln[len("[bench] "):] for ln in log.splitlines() if ln.startswith("[bench] ")]

    def once(prefix: str) -> str:
        hits = [ln for ln in bench if ln.startswith(prefix)]
        assert len(hits) == 1, (prefix, bench)
        return hits[0]

    once("neutral reference: 8 neutral texts")
    once("unsteered: validation, 3 prompts x 1")
    assert once("pool: generate 24 training prompts x 8 samples x 16 tokens").endswith("(for aura)")
    for arm in ("unsteered", "aura", "iti"):
        once(f"{arm}: test, 5 prompts x 2")
        once(f"{arm}: perplexity of 10 continuations")
        once(f"{arm}: side effects on 8 neutral texts")
        once(f"{arm}: timing, 2 alternating pairs of one test batch")
        assert " pairs" in once(f"{arm}: time x ")
    from steerlab.experiments.recipes import ITI_ALPHAS

    for arm, n in (("aura", 5), ("iti", len(ITI_ALPHAS))):  # aura: proportional + det0 at 4 distinct sizes
        assert bench.count(f"{arm}: fit") == 1
        assert once(f"{arm}: fitted in ").endswith(f"validation, {n} candidate settings x 3 prompts x 1")
    # a bar (a start and an end line) for each generation: the pool, every validation setting, every test arm
    lines = log.splitlines()
    assert "[generate b/pool] 192 rows" in lines and "[generate b/pool] done: 192/192 rows" in log
    # the validation grid: one bar over every setting's rows (steerlab.grid), 5 settings x 3 prompts
    assert "[validation: aura, 5 settings] 15 rows" in lines and "[validation: aura, 5 settings] done: 15/15 rows" in log
    assert all(f"[generate test/{arm}] 10 rows" in lines for arm in ("unsteered", "aura", "iti"))
    assert "contrast set's prompts (fallback" in once("aura: fitted in ")  # profanity: no toxic continuation
    # the time column: the median ratio, its CI and the pairs behind it, in timing.json and the CSV
    import csv
    import json

    for arm in metrics["arms"]:
        t = json.loads((tmp_path / "b" / "test" / arm["method"] / "timing.json").read_text())
        assert t["n_pairs"] == 2 and t["ci"][0] <= t["ratio"] <= t["ci"][1] and len(t["ratios"]) == t["n_pairs"]
        assert arm["generation_timing"] == t
    for r in csv.DictReader((tmp_path / "b" / "tables" / "results.csv").open()):
        assert float(r["generation_time_ratio_low"]) <= float(r["generation_time_ratio"]) <= float(
            r["generation_time_ratio_high"]) and int(r["generation_time_pairs"]) == 2
    # phases come in order for a method: fit, validation, test, side effects, timing
    aura = [ln for ln in bench if ln.startswith("aura: ")]
    order = ["aura: fit", "aura: fitted", "aura: test", "aura: side effects", "aura: timing"]
    assert [next(i for i, ln in enumerate(aura) if ln.startswith(p)) for p in order] == sorted(
        next(i for i, ln in enumerate(aura) if ln.startswith(p)) for p in order)


def test_median_ci_is_a_bootstrap_of_the_median():
    r = [1.0, 1.02, 0.99, 1.01, 1.0]
    lo, hi = median_ci(r)
    rng = np.random.default_rng(0)
    meds = np.median(np.asarray(r)[rng.integers(0, 5, (2000, 5))], axis=1)
    assert (lo, hi) == (np.percentile(meds, 2.5), np.percentile(meds, 97.5)) and lo <= 1.0 <= hi
    assert median_ci([1.3]) == (1.3, 1.3)


def test_timing_adds_pairs_until_the_ratio_is_known_within_tolerance(monkeypatch):
    clock = [0.0]  # a virtual clock: each generation advances it by the seconds it declares
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    log = []

    def plain(model, texts, cfg, keys=None):  # the plain model: 1 s per batch
        clock[0] += 1.0
        log.append("A")
        return [[""] for _ in texts]

    class Arm:
        def __init__(self, seconds):
            self.seconds = iter(seconds)

        def generate(self, model, texts, cfg, keys, **options):
            clock[0] += next(self.seconds)
            log.append("B")
            return [[""] for _ in texts]

    monkeypatch.setattr(G, "generate_batch", plain)
    m = tiny_model("llama")
    cfg = G.GenConfig(max_new_tokens=2, batch_size=2, k=1)
    t = generation_overhead(m, ["a b", "c d"], cfg, Arm([1.1, 1.12, 1.09, 1.1]), reps=1, max_reps=8, warmup=0)
    # steady: three pairs (the fewest the rule stops at), in alternating order, and a CI within 3%
    assert t["n_pairs"] == 3 and t["converged"] and t["ratio"] == pytest.approx(1.1)
    assert "".join(log) == "ABBAAB" and t["ci"] == list(median_ci(t["ratios"]))
    assert t["ci"][0] >= 0.97 * t["ratio"] and t["ci"][1] <= 1.03 * t["ratio"]
    # alternately much faster and much slower: never within 3%, so it stops at max_reps
    t = generation_overhead(m, ["a b"], cfg, Arm([0.5, 1.5] * 5), reps=2, max_reps=5, warmup=0)
    assert t["n_pairs"] == 5 and not t["converged"] and len(t["arm_seconds"]) == 5
    # without max_reps: exactly reps pairs, as before; two pairs are never called converged (their
    # bootstrap interval is only their range)
    t = generation_overhead(m, ["a b"], cfg, Arm([1.0] * 9), reps=2, warmup=0)
    assert t["n_pairs"] == 2 and not t["converged"] and t["ratio"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="max_reps >= reps"):
        generation_overhead(m, ["a b"], cfg, None, reps=3, max_reps=2)
