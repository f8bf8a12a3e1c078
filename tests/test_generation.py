"""Batched generation and resumable runs: determinism, SIGKILL-resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.generation import GenConfig, generate, generate_run
from steerlab.runs import RunDir, RunError
from tiny import tiny_model

PROMPTS = [f"prompt number {i} says" + "!" * (i % 5) for i in range(40)]
CFG = GenConfig(max_new_tokens=12, sampling="t1.0", k=2, seed=3, batch_size=4)


def test_generate_deterministic_and_matches_plain_generate(llama):
    a = generate(llama, PROMPTS[:6], CFG)
    b = generate(llama, PROMPTS[:6], CFG)
    assert a == b and len(a) == 6 and all(len(x) == 2 for x in a)
    assert len({tuple(x) for x in a}) > 1
    # greedy through steerlab equals a plain transformers generate of each prompt alone
    g = generate(llama, PROMPTS[:3], max_new_tokens=8)
    for p, conts in zip(PROMPTS[:3], g):
        enc = llama.encode([p])
        with torch.no_grad():
            out = llama.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                                    max_new_tokens=8, pad_token_id=0)
        assert conts == [llama.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_generate_sees_active_edits(llama):
    v = torch.randn(32) * 5
    plain = generate(llama, PROMPTS[:4], max_new_tokens=8)
    with sl.edit(llama, {"blocks.1.resid_post": sl.add(v)}):
        steered = generate(llama, PROMPTS[:4], max_new_tokens=8)
    assert plain != steered


def _save(tmp_path):
    m = tiny_model("llama")
    d = tmp_path / "model"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    return d


SCRIPT = """
import sys, steerlab as sl
from steerlab.generation import GenConfig, generate_run
m = sl.load(sys.argv[1])
prompts = [f"prompt number {i} says" + "!" * (i % 5) for i in range(40)]
generate_run(m, prompts, sys.argv[2], GenConfig(max_new_tokens=12, sampling="t1.0", k=2, seed=3, batch_size=4),
             progress=False)
"""


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    d = _save(tmp_path)
    m = sl.load(d)
    full = generate_run(m, PROMPTS, tmp_path / "full", CFG, progress=False)
    assert len(full) == 80

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(d), str(out)], env={**os.environ, "PYTHONPATH": "src"})
    res = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if res.exists() and res.read_bytes().count(b"\n") >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    n_before = res.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 8 <= n_before < 80, (proc.returncode, n_before)
    # a torn last line, as a crash in the middle of a write leaves it
    with open(res, "ab") as f:
        f.write(b'{"prompt_id": "x", "sam')
    resumed = generate_run(m, PROMPTS, out, CFG, progress=False)
    assert resumed == full
    lines = res.read_text().splitlines()
    assert len(lines) == 80 and len({(json.loads(x)["prompt_id"], json.loads(x)["sample"]) for x in lines}) == 80


def test_run_config_mismatch_and_corrupt_rows(tmp_path, llama):
    out = tmp_path / "run"
    generate_run(llama, PROMPTS[:4], out, GenConfig(max_new_tokens=4), progress=False)
    with pytest.raises(RunError, match="different config.*max_new_tokens"):
        generate_run(llama, PROMPTS[:4], out, GenConfig(max_new_tokens=5), progress=False)
    res = out / "results.jsonl"
    good = res.read_text()
    res.write_text("not json\n" + good)
    with pytest.raises(RunError, match="line 1 is not valid JSON"):
        RunDir(out, json.loads((out / "config.json").read_text())).rows()
    assert res.read_text() == "not json\n" + good  # nothing rewritten


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sampling="hot"), "unknown sampling preset 'hot'"),
        (dict(k=0), "must be >= 1"),
        (dict(k=3), "needs a sampling preset"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(sl.SteerlabError, match=message):
        GenConfig(**kw)


def test_empty_and_duplicate_prompts(llama):
    with pytest.raises(sl.EmptyInputError, match="no prompts"):
        generate(llama, [])
    with pytest.raises(sl.SteerlabError, match="appears twice"):
        generate(llama, ["same", "same"])


def test_scored_run_rows(tmp_path, llama):
    class Lengths:  # a real, tiny scorer: share of '!' characters
        name, attributes = "bang", ["bang"]

        def score(self, texts):
            import numpy as np

            return {"bang": np.array([t.count("!") / max(1, len(t)) for t in texts])}

    rows = generate_run(llama, PROMPTS[:3], tmp_path / "s", GenConfig(max_new_tokens=6), scorer=Lengths(), progress=False)
    for r in rows:
        assert r["toxicity"] == pytest.approx(r["continuation"].count("!") / max(1, len(r["continuation"])))
    assert json.loads(Path(tmp_path / "s" / "config.json").read_text())["scorer"] == "bang"


def test_model_generate_text_and_tokens(llama):
    """Model.generate: text and token ids, equal to generate() and to decoding its own tokens; k rows per prompt."""
    out = llama.generate(PROMPTS[:5], max_new_tokens=8)
    assert out.per_prompt() == generate(llama, PROMPTS[:5], max_new_tokens=8)
    assert out.texts == [llama.tok.decode(t, skip_special_tokens=True) for t in out.tokens]
    assert all(0 < len(t) <= 8 and 1 not in t for t in out.tokens)  # cut before <eos> (id 1)
    one = llama.generate(PROMPTS[0], max_new_tokens=8)
    assert one.text == out.texts[0] and one.prompts == [PROMPTS[0]]
    sampled = llama.generate(PROMPTS[:3], max_new_tokens=8, sampling="t1.0", k=2, seed=3)
    assert len(sampled.texts) == 6 and sampled.per_prompt() == generate(llama, PROMPTS[:3], CFG, max_new_tokens=8)
    with pytest.raises(sl.SteerlabError, match="6 continuations"):
        _ = sampled.text
    with pytest.raises(sl.SteerlabError, match="needs a sampling preset"):
        llama.generate(PROMPTS[:2], k=2)


def test_trim_tokens_stops_at_first_eos(llama):
    from steerlab.generation import trim_tokens

    new = torch.tensor([[5, 6, 1, 0, 0], [7, 8, 9, 10, 11], [1, 0, 0, 0, 0]])
    assert trim_tokens(llama, new) == [[5, 6], [7, 8, 9, 10, 11], []]


def test_model_generate_defaults_equal_the_cli():
    """Python's defaults (Model.generate, GenConfig) are `steerlab generate`'s."""
    import inspect

    import typer

    from steerlab.cli import app
    from steerlab.models.model import Model

    cmd = typer.main.get_command(app).commands["generate"]
    cli = {p.name: p.default for p in cmd.params}
    py = {n: p.default for n, p in inspect.signature(Model.generate).parameters.items() if n not in ("self", "prompts")}
    assert set(py) - {"progress"} <= set(cli) | {"k"}
    for name, value in py.items():
        if name != "progress":
            assert cli[name] == value == getattr(GenConfig(), name), name


def test_generate_calls_count_their_tokens_and_seconds(llama):
    from steerlab.generation import generate_ids
    from steerlab.profile import PROFILE, generation_summary

    PROFILE.reset()
    cfg = GenConfig(max_new_tokens=5, sampling="t1.0", k=2, seed=0)
    a = generate_ids(llama, ["hello there", "a"], cfg)
    b = generate_ids(llama, ["steer me"], cfg)
    s = generation_summary(wall=1e6)
    # rows x steps of every call (padding after an early end counts: the forward paid for it)
    assert s["generated_tokens"] == a.numel() + b.numel() == (4 + 2) * 5
    assert s["generate_seconds"] >= 0 and 0 <= s["share_of_wall"] < 1e-3
    PROFILE.reset()
    assert generation_summary(10.0)["generated_tokens"] == 0
