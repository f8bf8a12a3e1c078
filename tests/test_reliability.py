"""Bad inputs and faults: each gets a one-line error naming the problem, and nothing written before
is lost (see docs/reliability.md)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import app
from steerlab.generation import GenConfig, generate_run
from steerlab.runs import RunDir, RunError
from tiny import PROMPTS, flat, model_dir

runner = CliRunner()


def _hold_lock(path):
    """A second process that opens the run directory and keeps it."""
    code = ("import sys, time; from steerlab.runs import RunDir; r = RunDir(sys.argv[1], {'kind': 'x'}); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    holder = _hold_lock(tmp_path / "run")
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunError, match=rf"in use by another run \(pid {holder.pid} on"):
            RunDir(tmp_path / "run", {"kind": "x"})
        assert time.perf_counter() - t0 < 5
        d = model_dir(tmp_path)
        prompts = tmp_path / "p.txt"
        prompts.write_text("one\ntwo\n")
        r = runner.invoke(app, ["generate", "--out", str(tmp_path / "run"), "--model", d, "--prompts", str(prompts),
                                "--scorer", "none", "--max-new-tokens", "2"])
        assert r.exit_code == 2 and f"pid {holder.pid}" in flat(r.output)
        assert not (tmp_path / "run" / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path / "run", {"kind": "x"}) as run:  # free again once the holder is gone
        run.append([{"k": 1}])


def test_duplicate_rows_are_dropped_on_read(tmp_path, llama):
    cfg = GenConfig(max_new_tokens=3)
    rows = generate_run(llama, PROMPTS[:3], tmp_path / "run", cfg, progress=False)
    f = tmp_path / "run" / "results.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + [lines[0]]) + "\n")  # a line duplicated by hand
    again = generate_run(llama, PROMPTS[:3], tmp_path / "run", cfg, progress=False)
    assert len(again) == len(rows) == 3 and again == rows
    f.write_text(f.read_text() + json.dumps({"sample": 0, "continuation": "x"}) + "\n")
    with pytest.raises(RunError, match="lacks the field 'prompt_id'"):
        generate_run(llama, PROMPTS[:3], tmp_path / "run", cfg, progress=False)


def test_timings_add_up_over_resumed_calls(tmp_path, llama):
    cfg = GenConfig(max_new_tokens=3, batch_size=1)
    generate_run(llama, PROMPTS[:2], tmp_path / "run", cfg, progress=False)
    first = json.loads((tmp_path / "run" / "record.json").read_text())["generate_seconds"]
    generate_run(llama, PROMPTS[:4], tmp_path / "run2", cfg, progress=False)
    f = tmp_path / "run2" / "results.jsonl"
    f.write_text("\n".join(f.read_text().splitlines()[:2]) + "\n")  # lose the last two rows
    before = json.loads((tmp_path / "run2" / "record.json").read_text())["generate_seconds"]
    generate_run(llama, PROMPTS[:4], tmp_path / "run2", cfg, progress=False)
    after = json.loads((tmp_path / "run2" / "record.json").read_text())["generate_seconds"]
    assert first > 0 and after > before > 0


@pytest.mark.parametrize("args, message", [
    (["lens", ""], "is empty"),
    (["lens", "hello", "-k", "100000"], "k must be between 1 and the vocabulary size"),
    (["steer", "study", "--out", "OUT/s", "--layers", "x"], "comma-separated list of ints"),
    (["steer", "study", "--out", "OUT/s", "--alphas", "abc"], "comma-separated list of floats"),
    (["demo", "-m", "nosuch"], "nosuch"),
])
def test_cli_bad_input_one_line_errors(tmp_path, args, message):
    d = model_dir(tmp_path)
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    if args[0] in ("lens", "steer"):
        args += ["--model", d]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert message in flat(r.output) and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_cli_outputs_into_directories_are_refused(tmp_path, llama):
    from steerlab.steer import SteeringVector

    texts = tmp_path / "t.txt"
    texts.write_text("hello there\n")
    r = runner.invoke(app, ["score", str(texts), "--scorer", "profanity", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in flat(r.output)
    vec = SteeringVector({"blocks.1.resid_post": torch.ones(32)}).save(tmp_path / "v.safetensors")
    r = runner.invoke(app, ["steer", "export-gguf", str(vec), str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in flat(r.output)
    r = runner.invoke(app, ["generate", "--out", str(vec), "--model", model_dir(tmp_path), "--prompts", str(texts),
                            "--scorer", "none"])
    assert r.exit_code == 2 and "is not a directory" in flat(r.output)
    assert vec.stat().st_size > 0  # the file given as --out is untouched


def test_python_api_bad_input(tmp_path, llama):
    from steerlab.steer import SteeringVector, VectorError

    enc = llama.encode(PROMPTS)

    def run(edits):
        with sl.edit(llama, edits), torch.no_grad():
            llama.forward(enc["input_ids"], enc["attention_mask"])

    with pytest.raises(sl.ShapeError, match="returned float; an edit function must return a tensor"):
        run({"blocks.0.resid_post": lambda a, s: 1.0})
    with pytest.raises(sl.ShapeError, match="returned dtype torch.float64"):
        run({"blocks.0.resid_post": lambda a, s: a.double()})
    with pytest.raises(sl.ShapeError, match="not a function"):
        run({"blocks.0.resid_post": 3.0})
    with pytest.raises(sl.SiteError, match="a site is a name"):
        sl.capture(llama, PROMPTS, [5])
    with pytest.raises(sl.EmptyInputError, match="is empty"):
        sl.capture(llama, ["fine", ""], "final")
    with pytest.raises(sl.EmptyInputError, match="is empty"):
        generate_run(llama, ["fine", ""], tmp_path / "g", GenConfig(max_new_tokens=2), progress=False)
    assert not (tmp_path / "g").exists()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(VectorError, match="not a readable GGUF"):
        SteeringVector.from_gguf(tmp_path / "bad.gguf")
    with pytest.raises(VectorError, match="non-finite"):
        SteeringVector({"blocks.0.resid_post": torch.full((32,), float("nan"))})
    a = SteeringVector({"blocks.0.resid_post": torch.ones(32)}, {"model_fingerprint": "aaa"})
    b = SteeringVector({"blocks.0.resid_post": torch.ones(32)}, {"model_fingerprint": "bbb"})
    with pytest.raises(VectorError, match="different models"):
        a + b


def test_selfcorrect_options_are_checked_before_generation(tmp_path):
    from steerlab.experiments.selfcorrect import SelfCorrectError, make_config

    with pytest.raises(SelfCorrectError, match="steer_positions"):
        make_config("tiny", steer_positions="nope").validate()
    r = runner.invoke(app, ["selfcorrect", "--out", str(tmp_path / "sc"), "--steer-positions", "nope"])
    assert r.exit_code == 2 and "steer_positions" in flat(r.output) and not (tmp_path / "sc").exists()


def test_scorer_options_from_the_command_line(tmp_path):
    from steerlab.scoring import get_scorer
    from test_scoring_hf import _bert_dir

    d = tmp_path / "clf"
    _bert_dir(d, {0: "neutral", 1: "toxic"})
    texts = tmp_path / "t.txt"
    texts.write_text("you are lovely\nyou are awful\n")
    out = tmp_path / "scores.jsonl"
    r = runner.invoke(app, ["score", str(texts), "--scorer", "hf-classifier", "--scorer-option", f"model={d}",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = [json.loads(x)["toxic"] for x in out.read_text().splitlines()]
    want = get_scorer("hf-classifier", model=str(d)).score(["you are lovely", "you are awful"])["toxic"]
    assert got == pytest.approx(want.tolist())
    r = runner.invoke(app, ["score", str(texts), "--scorer", f"hf-classifier:{d}"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", str(texts), "--scorer", "profanity", "--scorer-option", "colour=1"])
    assert r.exit_code == 2 and "colour" in flat(r.output)


def test_unwritable_output_path_is_an_error_and_leaves_nothing(tmp_path):
    from steerlab.errors import SteerlabError
    from steerlab.steer import SteeringVector

    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")
    sv = SteeringVector({"blocks.0.resid_post": torch.ones(32)})
    with pytest.raises(SteerlabError, match="cannot write"):
        sv.save(blocker / "v.safetensors")  # root ignores permission bits; a path under a file is unwritable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_rows_holding_unicode_line_separators_read_back_whole(tmp_path):
    """A model's continuation can hold U+2028 and other characters that str.splitlines() splits on
    (found in a real pool of continuations); JSON writes them raw, and reading must not cut the row."""
    from steerlab.data.prompts import jsonl_rows
    from steerlab.runs import RunDir, write_jsonl

    odd = ["them.\u2028You cannot", "a\u2029b", "c\x85d", "e\x1cf\x1dg\x1eh", "i\x0bj\x0ck", "plain"]
    rows = [{"prompt_id": str(i), "sample": 0, "continuation": t} for i, t in enumerate(odd)]
    with RunDir(tmp_path / "run", {"kind": "test"}) as run:
        run.append(rows)
        assert run.rows() == rows
    write_jsonl(tmp_path / "p.jsonl", rows)
    assert [r for _, r in jsonl_rows(tmp_path / "p.jsonl")] == rows
    assert [n for n, _ in jsonl_rows(tmp_path / "p.jsonl")] == list(range(1, len(rows) + 1))


def test_measurements_are_cached_by_their_inputs_and_read_back(tmp_path, llama, monkeypatch):
    """A resumed run measures nothing twice: the continuations' likelihoods and an arm's side effects
    are kept in the run directory under a key of their inputs, read back while it holds, and measured
    again when an input changes (or the file is unreadable); the numbers read back equal fresh ones."""
    import steerlab.evaluation as E
    from steerlab.evaluation import neutral_reference
    from steerlab.metrics.lm import perplexity
    from steerlab.runs import cached_json

    calls = []
    real = E.perplexity
    monkeypatch.setattr(E, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts, conts = ["The cat", "A dog is"], [" sat on the mat", " here"]
    rows = lambda cs: [{"prompt": p, "continuation": c} for p, c in zip(prompts, cs)]  # noqa: E731
    f = tmp_path / "fluency.json"
    [(nll, n)] = E.continuation_nlls(llama, [rows(conts)], caches=[f])
    fresh = perplexity(llama, conts, prompts=prompts)
    np.testing.assert_allclose(nll, fresh.nll, rtol=1e-5)
    np.testing.assert_array_equal(n, fresh.n_tokens)
    [again] = E.continuation_nlls(llama, [rows(conts)], caches=[f])
    assert len(calls) == 1 and np.array_equal(again[0], nll) and np.array_equal(again[1], n)
    [other] = E.continuation_nlls(llama, [rows([" sat on the mat", " there"])], caches=[f])  # a changed text
    assert len(calls) == 2 and abs(other[0][0] - nll[0]) < 1e-5 and other[0][1] != nll[1]
    f.write_text("{not json")  # an unreadable cache is measured again and rewritten
    assert np.allclose(E.continuation_nlls(llama, [rows(conts)], caches=[f])[0][0], nll) and len(calls) == 3
    # several groups: the ones held are read back, the others measured together in one pass
    h = tmp_path / "other.json"
    both = E.continuation_nlls(llama, [rows(conts), rows([" is", " barking"])], caches=[f, h])
    assert len(calls) == 4 and np.array_equal(both[0][0], E.continuation_nlls(llama, [rows(conts)], caches=[f])[0][0])
    np.testing.assert_allclose(both[1][0], perplexity(llama, [" is", " barking"], prompts=prompts).nll, rtol=1e-5)
    g = tmp_path / "value.json"
    assert cached_json(g, {"x": 1}, lambda: 5.0) == 5.0 and cached_json(g, {"x": 1}, lambda: 7.0) == 5.0
    assert cached_json(g, {"x": 2}, lambda: 7.0) == 7.0 and cached_json(None, {"x": 2}, lambda: 8.0) == 8.0
    # an arm's perplexity and side effects: measured once per (rows, edit, options, texts)
    texts = ["Water boils at one hundred degrees.", "The train leaves at noon."]
    ref = neutral_reference(llama, texts)
    from steerlab.scoring import get_scorer
    from steerlab.steer.vector import SteeringVector

    iv = SteeringVector({"blocks.1.resid_post": torch.randn(llama.d_model, generator=torch.Generator().manual_seed(0))})
    cfg, scorer = GenConfig(max_new_tokens=3, sampling="greedy", k=1), get_scorer("profanity")
    first, _ = E.evaluate_arm(llama, prompts, tmp_path / "arm", cfg, scorer, ref, texts, intervention=iv)
    n_calls = len(calls)
    second, _ = E.evaluate_arm(llama, prompts, tmp_path / "arm", cfg, scorer, ref, texts, intervention=iv)
    assert len(calls) == n_calls and second["side_effects"] == first["side_effects"]
    assert second["fluency"] == first["fluency"] and (tmp_path / "arm" / "side_effects.json").exists()
    stronger, _ = E.evaluate_arm(llama, prompts, tmp_path / "arm3", cfg, scorer, ref, texts, intervention=iv,
                                 apply_options={"alpha": 3.0})
    assert stronger["side_effects"]["kl_from_unedited"] != first["side_effects"]["kl_from_unedited"]
