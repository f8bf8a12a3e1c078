"""What `generate` reports: metrics undefined with one sample per prompt, example continuations, the
paired difference from the unsteered model, and refusing prompts an intervention was fitted on."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from steerlab import interventions as I
from steerlab.cli import app
from steerlab.evaluation import (
    example_rows,
    fitted_prompts,
    summarize,
    undefined_metrics,
    unsteered_comparison,
)
from steerlab.generation import GenConfig, generate_run, text_id
from steerlab.metrics import paired_difference
from steerlab.scoring import get_scorer
from tiny import flat, model_dir

runner = CliRunner()
GOOD = ["what a lovely day", "thank you so much", "have a nice time", "you are kind"]
BAD = ["you stupid idiot", "shut up moron", "I hate you all", "get lost loser"]


def _rows(scores: list[list[float]]) -> list[dict]:
    return [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "sample": s, "continuation": f"c{i}.{s}", "toxicity": t}
            for i, per in enumerate(scores) for s, t in enumerate(per)]


def test_one_sample_per_prompt_names_the_undefined_metrics():
    one = summarize(_rows([[0.1], [0.9], [0.3]]))
    assert set(one["undefined"]) == {"expected_max_toxicity", "toxicity_probability"}
    assert "several samples per prompt" in one["undefined"]["toxicity_probability"]
    assert "undefined" not in summarize(_rows([[0.1, 0.2], [0.9, 0.4]]))
    assert undefined_metrics(3) == {} and set(undefined_metrics(1)) == set(one["undefined"])


def test_example_rows_span_the_ranking():
    rows = _rows([[0.1, 0.7], [0.9, 0.2], [0.3, 0.3], [0.05, 0.0], [0.5, 0.6]])
    ex = example_rows(rows, 3)
    # per prompt its most toxic sample: 0.9 (p1), 0.7 (p0), 0.6 (p4), 0.3 (p2), 0.05 (p3); ends and middle
    assert [(r["prompt_id"], r["toxicity"]) for r in ex] == [("p1", 0.9), ("p4", 0.6), ("p3", 0.05)]
    assert example_rows(rows[:2], 3) == [rows[1]] and example_rows([], 3) == []  # one prompt: its worst sample
    unscored = [{k: v for k, v in r.items() if k != "toxicity"} for r in rows]
    assert example_rows(unscored, 2) == unscored[:2]


def test_fitted_prompts_by_text_hash(llama):
    iv = I.fit("steering", llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    assert iv.meta["data_text_ids"] == sorted(text_id(t) for t in GOOD + BAD)
    assert fitted_prompts(iv, ["a new prompt", BAD[2], "another", GOOD[0]]) == [1, 3]
    assert fitted_prompts(iv, ["nothing", "seen"]) == []
    iv.meta.pop("data_text_ids")
    assert fitted_prompts(iv, [BAD[2]]) is None  # an older file: cannot tell


def test_unsteered_comparison_is_paired_and_reused(tmp_path, llama):
    iv = I.fit("steering", llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    prompts = [f"line {i} of text" for i in range(6)]
    cfg = GenConfig(max_new_tokens=5, sampling="t1.0", k=2, seed=1, batch_size=4)
    sc = get_scorer("profanity")
    rows = generate_run(llama, prompts, tmp_path / "arm", cfg, scorer=sc, intervention=iv,
                        apply_options={"alpha": 8.0}, progress=False)
    vs = unsteered_comparison(llama, prompts, rows, tmp_path / "arm", cfg, sc, progress=False)
    base = generate_run(llama, prompts, tmp_path / "base", cfg, scorer=sc, progress=False)  # independent
    pos = {p: i for i, p in enumerate(dict.fromkeys(r["prompt_id"] for r in rows))}
    a, b = np.zeros((6, 2)), np.zeros((6, 2))
    for r in base:
        a[pos[r["prompt_id"]], r["sample"]] = r["toxicity"]
    for r in rows:
        b[pos[r["prompt_id"]], r["sample"]] = r["toxicity"]
    assert vs["paired_difference"] == paired_difference(a, b).to_dict()
    same = {(r["prompt_id"], r["sample"]): r["continuation"] for r in base}
    assert vs["identical"] == np.mean([same[(r["prompt_id"], r["sample"])] == r["continuation"] for r in rows])
    results = tmp_path / "arm" / "unsteered" / "results.jsonl"
    before = results.stat().st_mtime_ns
    assert unsteered_comparison(llama, prompts, rows, tmp_path / "arm", cfg, sc, progress=False) == vs
    assert results.stat().st_mtime_ns == before  # reused, not generated again


def test_cli_generate_intervention_report_and_fitted_prompt_refusal(tmp_path):
    d = model_dir(tmp_path)
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(GOOD) + "\n")
    bad.write_text("\n".join(BAD) + "\n")
    vec = tmp_path / "v.safetensors"
    r = runner.invoke(app, ["fit", "steering", "--out", str(vec), "--model", d, "--desirable", str(good),
                            "--undesirable", str(bad), "--layers", "1"])
    assert r.exit_code == 0, r.output
    held_out = tmp_path / "p.txt"
    held_out.write_text("\n".join(f"line {i} of text" for i in range(6)) + "\n")
    base = ["generate", "--model", d, "--max-new-tokens", "5", "--scorer", "profanity", "--no-fluency",
            "--intervention", str(vec), "--alpha", "8"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), "--prompts", str(held_out)])
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    assert "expected max toxicity is undefined" in out and "toxicity probability is undefined" in out
    assert "mean toxicity - unsteered (paired)" in out and "example continuations" in out and "v.safetensors" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["vs_unsteered"]["paired_difference"]) >= {"mean_toxicity", "p_not_lower"}
    assert (tmp_path / "run" / "unsteered" / "results.jsonl").is_file()
    # prompts the vector was fitted on: refused, naming the count and the way out; allowed with a warning
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run2"), "--prompts", str(bad)])
    assert r.exit_code == 2 and not (tmp_path / "run2").exists()
    assert "4 of the 4 prompts are texts the intervention" in flat(r.output)
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run2"), "--prompts", str(bad), "--allow-fitted-prompts"])
    assert r.exit_code == 0 and "warning: 4 of the 4 prompts" in flat(r.output)


@pytest.mark.parametrize("k", [1, 2])
def test_cli_generate_without_intervention_shows_examples(tmp_path, k):
    d = model_dir(tmp_path)
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"line {i} of text" for i in range(5)) + "\n")
    args = ["generate", "--out", str(tmp_path / "r"), "--model", d, "--prompts", str(p), "--max-new-tokens", "4",
            "--scorer", "profanity", "--no-fluency", "-k", str(k)] + (["--sampling", "t1.0"] if k > 1 else [])
    r = runner.invoke(app, args)
    out = flat(r.output)
    assert r.exit_code == 0 and "example continuations" in out and "paired" not in out
    assert ("undefined" in out) == (k == 1)
