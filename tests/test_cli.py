"""The command line, run in-process on a tiny model saved to disk."""

from typer.testing import CliRunner

from steerlab.cli import app
from tiny import model_dir, tiny_model

runner = CliRunner()


def test_lens_cli(tmp_path):
    d = model_dir(tmp_path)
    r = runner.invoke(app, ["lens", "hello", "--model", d, "-k", "2", "--layers", "0,-1"])
    assert r.exit_code == 0, r.output
    assert "logit lens" in r.output and "top 2" in r.output
    rows = [line for line in r.output.splitlines() if line.strip().startswith(("│     0", "│     2"))]
    assert len(rows) == 2


def test_lens_cli_errors(tmp_path):
    d = model_dir(tmp_path)
    r = runner.invoke(app, ["lens", "hello", "--model", d, "--layers", "9"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(app, ["lens", "hello", "--model", str(tmp_path / "nope.gguf")])
    assert r.exit_code == 2 and "GGUF file not found" in r.output


def test_info_and_help(tmp_path):
    d = model_dir(tmp_path)
    r = runner.invoke(app, ["info", "--model", d])
    assert r.exit_code == 0 and "fingerprint" in r.output and "llama" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "lens" in r.output


def test_generate_and_score_cli(tmp_path):
    import json

    d = model_dir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"line {i} of text" for i in range(6)) + "\n")
    out = tmp_path / "run"
    args = ["generate", "--out", str(out), "--model", d, "--prompts", str(prompts), "-k", "2", "--sampling", "t1.0",
            "--max-new-tokens", "5", "--scorer", "profanity"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(0 <= x["toxicity"] <= 1 for x in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    emt = metrics["toxicity"]["expected_max_toxicity"]
    by = {}
    for x in rows:
        by.setdefault(x["prompt_id"], []).append(x["toxicity"])
    assert emt["value"] == sum(max(v) for v in by.values()) / 6
    assert emt["lo"] <= emt["value"] <= emt["hi"]
    assert "expected max toxicity" in r.output
    assert metrics["fluency"]["reference_model"] == "tiny" and metrics["fluency"]["perplexity"] > 1
    # the perplexity under another reference model, named on the command line
    other = tmp_path / "other"
    tiny_model("llama", seed=3).hf.save_pretrained(other)
    tiny_model("llama").tok.save_pretrained(other)
    r_ref = runner.invoke(app, args + ["--fluency-model", str(other)])
    assert r_ref.exit_code == 0, r_ref.output
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["fluency"]["reference_model"] == "other"
    assert m2["fluency"]["perplexity"] != metrics["fluency"]["perplexity"]
    assert m2["toxicity"] == metrics["toxicity"]  # same rows (resumed), same toxicity
    # the same command again resumes (nothing to do) and gives the same rows
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and (out / "results.jsonl").read_text().count("\n") == 12
    # another config in the same directory is refused, and the rows stay
    r3 = runner.invoke(app, args[:-2] + ["--scorer", "jigsaw-bilstm"])
    assert r3.exit_code == 2 and "different config" in r3.output
    assert (out / "results.jsonl").read_text().count("\n") == 12

    scored = tmp_path / "scored.jsonl"
    r = runner.invoke(app, ["score", str(prompts), "--scorer", "profanity", "--out", str(scored)])
    assert r.exit_code == 0, r.output
    assert len(scored.read_text().splitlines()) == 6
    r = runner.invoke(app, ["score", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["score", str(prompts), "--scorer", "nope"])
    assert r.exit_code == 2 and "nope" in r.output


def test_global_threads_option():
    import torch

    before = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["--threads", "1", "models"])
        assert r.exit_code == 0 and "smollm2-135m-instruct" in r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_steer_cli(tmp_path):
    import json

    import gguf

    d = model_dir(tmp_path)
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("what a lovely day\nthank you\n")
    bad.write_text("you idiot\nshut up\n")
    vec = tmp_path / "v.safetensors"
    r = runner.invoke(app, ["steer", "fit", "--out", str(vec), "--model", d, "--desirable", str(good),
                            "--undesirable", str(bad), "--layers", "1,2", "--positions", "last"])
    assert r.exit_code == 0, r.output
    assert "2 directions (mean_diff, last, unit)" in r.output and "saved steering" in r.output
    r = runner.invoke(app, ["steer", "export-gguf", str(vec), str(tmp_path / "v.gguf")])
    assert r.exit_code == 0, r.output
    assert {t.name for t in gguf.GGUFReader(str(tmp_path / "v.gguf")).tensors} == {"direction.1", "direction.2"}
    r = runner.invoke(app, ["steer", "fit", "--out", str(vec), "--model", d, "--desirable", str(good),
                            "--undesirable", str(tmp_path / "none.txt")])
    assert r.exit_code == 2 and "does not exist" in r.output
    out = tmp_path / "study"
    r = runner.invoke(app, ["steer", "study", "--out", str(out), "--model", d, "--layers", "0,1", "--alphas", "-1,0,1",
                            "--n-pairs", "4", "--n-sweep", "3", "--k-sweep", "2", "--n-test", "4", "--k-test", "2",
                            "--max-new-tokens", "3", "--scorer", "profanity", "--max-ppl-ratio", "100",
                            "--min-distinct-ratio", "0", "--k-refine", "2", "--n-neutral", "4"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chosen"]["alpha"] == 1.0 and "unsteered" in r.output
    rows = (out / "sweep" / "add_all" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2 * (3 + 2 * 2 * 3)  # k_sweep x (baseline + 2 layers x 2 strengths) x 3 prompts


def test_demo_passes_every_bench_option_explicitly(monkeypatch):
    """`steerlab demo` calls the `bench` command function directly, so any bench option it leaves out
    would arrive as typer's OptionInfo default (a truthy object), not as the option's value."""
    import inspect

    from steerlab.cli import bench as cli

    params = set(inspect.signature(inspect.unwrap(cli.bench)).parameters)
    seen = {}
    monkeypatch.setattr(cli, "bench", lambda **kw: seen.update(kw))
    cli.demo(model="default", out="runs/x")
    assert set(seen) == params  # the settings arrive as one dict (the benchmark's fields, generated options)
    from steerlab.experiments.bench_config import PRESETS, BenchConfig, make_config

    assert make_config(**seen["settings"]) == BenchConfig(preset="quick", **PRESETS["quick"])


def test_threads_after_the_command_version_and_grouped_help(tmp_path):
    import torch

    import steerlab

    d = model_dir(tmp_path)
    before = torch.get_num_threads()
    try:
        r = runner.invoke(app, ["info", "--model", d, "--threads", "1"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"steerlab {steerlab.__version__}"
    r = runner.invoke(app, ["--help"])
    panels = [p for p in ("Main job", "Explain", "Steer", "Evaluate", "Utilities") if p in r.output]
    assert panels == ["Main job", "Explain", "Steer", "Evaluate", "Utilities"]
    assert sorted(panels, key=r.output.index) == panels
    assert all(len(line) <= 80 for line in r.output.splitlines())


def test_cli_modules_stay_small():
    from pathlib import Path

    import steerlab.cli

    sizes = {f.name: len(f.read_text().splitlines()) for f in Path(steerlab.cli.__file__).parent.glob("*.py")}
    assert max(sizes.values()) <= 300, sizes
