"""Data-parallel runs (steerlab.parallel): `accelerate launch --num_processes 2` on the CPU gives the
one-process run's rows and metrics in one run directory, resumes, and fails cleanly on every rank."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

import steerlab
from steerlab.cli import app
from steerlab.generation import GenConfig, generate_run
from steerlab.runs import RunDir, RunError
from tiny import PROMPTS, model_dir

runner = CliRunner()
SRC = str(Path(steerlab.__file__).resolve().parent.parent)  # this checkout's code, for the launched processes
gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available in this torch build")
GEN = ["--prompts", "rtp", "--n", "7", "-k", "2", "--sampling", "t1.0", "--max-new-tokens", "4", "--batch-size", "2",
       "--scorer", "profanity"]
BENCH = ["--methods", "steering", "--scorer", "profanity", "--n-val", "3", "--n-test", "5", "--k", "2",
         "--max-new-tokens", "3", "--batch-size", "2"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, n: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes n -m steerlab --threads 1 ARGS`` (torchrun underneath;
    the processes talk over gloo, so this runs on a CPU-only machine)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "steerlab", "--threads", "1", *args]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def one_process(*args: str) -> None:
    r = runner.invoke(app, ["--threads", "1", *args])
    assert r.exit_code == 0, r.output


def rows(d: Path) -> list[dict]:
    out = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines()]
    return sorted(out, key=lambda r: (r["prompt_id"], r["sample"]))


def untimed(obj):
    """metrics without the timings (wall and generation seconds, the profile's stage shares differ between
    any two runs)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if "seconds" not in k and k not in (
            "generation_time_ratio", "generation_timing", "profile", "generation")}  # generation: rank 0's own counts
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


@gloo
def test_two_processes_generate_the_one_process_run_and_resume(tmp_path, one_thread):
    d = model_dir(tmp_path)
    one_process("generate", "--model", d, *GEN, "--out", str(tmp_path / "one"))
    two = tmp_path / "two"
    r = launch("generate", "--model", d, *GEN, "--out", str(two))
    assert r.returncode == 0, r.stdout + r.stderr
    ref = rows(tmp_path / "one")
    assert len(ref) == 14 and rows(two) == ref
    assert json.loads((two / "metrics.json").read_text()) == json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert not (two / "shards").exists() and json.loads((two / "record.json").read_text())["processes"] == 2
    assert r.stdout.count("14 continuations") == 1  # rank 0 reports, once
    # a killed run: the merged file lost rows and ends in a torn line; rerunning with 2 processes completes it
    lines = (two / "results.jsonl").read_text().splitlines()
    (two / "results.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    r = launch("generate", "--model", d, *GEN, "--out", str(two))
    assert r.returncode == 0, r.stdout + r.stderr
    assert rows(two) == ref
    # an error on rank 0 (another config in the directory) ends every process with the one-line message
    r = launch("generate", "--model", d, *GEN[:-6], "--max-new-tokens", "5", *GEN[-4:], "--out", str(two))
    assert r.returncode != 0 and "holds a run with a different config" in r.stdout, r.stdout + r.stderr
    assert rows(two) == ref


@gloo
def test_two_processes_bench_the_one_process_run(tmp_path, one_thread):
    d = model_dir(tmp_path)
    one_process("bench", "--model", d, *BENCH, "--out", str(tmp_path / "one"))
    r = launch("bench", "--model", d, *BENCH, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(str(f.relative_to(one)) for f in one.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(two)) for f in two.rglob("*") if f.is_file())  # no shards left
    runs = [f.parent for f in one.rglob("results.jsonl")]
    assert len(runs) >= 3  # validation and test of the baseline, every validation setting and the test of steering
    for run in runs:
        assert rows(two / run.relative_to(one)) == rows(run), run
    m1, m2 = (json.loads((x / "metrics.json").read_text()) for x in (one, two))
    assert m1["arms"][1]["method"] == "steering" and m1["arms"][1]["status"] == "ok"
    assert json.dumps(untimed(m2)) == json.dumps(untimed(m1))  # NaN-safe comparison of everything untimed
    # the fitted direction of rank 0 is the one-process fit
    assert (one / "fit" / "steering.safetensors").read_bytes() == (two / "fit" / "steering.safetensors").read_bytes()


def test_a_killed_data_parallel_run_resumes_in_one_process(tmp_path, llama):
    cfg = GenConfig(max_new_tokens=3, sampling="t1.0", k=2, batch_size=2)
    ref = generate_run(llama, PROMPTS, tmp_path / "ref", cfg, progress=False)
    d = tmp_path / "run"
    generate_run(llama, PROMPTS, d, cfg, progress=False)
    config = json.loads((d / "config.json").read_text())
    key = {(r["prompt_id"], r["sample"]): r for r in ref}
    order = [(r["prompt_id"], r["sample"]) for r in ref]
    # what a 2-process call killed before its merge leaves: 2 merged rows, two shards (one with a torn last line)
    (d / "results.jsonl").write_text("".join(json.dumps(key[k]) + "\n" for k in order[:2]))
    for rank, ks in ((0, order[2:4]), (1, order[4:5])):
        with RunDir(d / "shards" / f"rank{rank}", {**config, "shard": {"rank": rank, "processes": 2}}) as sh:
            sh.append([{**key[k], "continuation": f"from shard {rank}"} for k in ks])
    with open(d / "shards" / "rank1" / "results.jsonl", "a") as f:
        f.write('{"prompt_id": "torn')
    out = generate_run(llama, PROMPTS, d, cfg, progress=False)
    merged = {(r["prompt_id"], r["sample"]): r["continuation"] for r in out}
    # the shards' rows are taken as written (not generated again), the rest is generated as in the reference
    assert [merged[k] for k in order[2:5]] == ["from shard 0"] * 2 + ["from shard 1"]
    assert [merged[k] for k in order[:2] + order[5:]] == [key[k]["continuation"] for k in order[:2] + order[5:]]
    assert len(out) == len(ref) and not (d / "shards").exists()
    # a shard of another run is refused, naming it, and nothing is merged
    generate_run(llama, PROMPTS, d, cfg, overwrite=True, progress=False)
    with RunDir(d / "shards" / "rank0", {**config, "max_new_tokens": 9, "shard": {"rank": 0, "processes": 2}}):
        pass
    with pytest.raises(RunError, match="holds a shard of another run"):
        generate_run(llama, PROMPTS, d, cfg, progress=False)
    shutil.rmtree(d / "shards")
    assert generate_run(llama, PROMPTS, d, cfg, progress=False) == ref


def test_device_map_auto_from_the_command_line(tmp_path, one_thread):
    pytest.importorskip("accelerate")
    d = model_dir(tmp_path)
    args = ["generate", "--model", d, "--prompts", "neutral", "--n", "3", "--max-new-tokens", "4", "--scorer", "none"]
    one_process(*args, "--out", str(tmp_path / "plain"))
    one_process(*args, "--device-map", "auto", "--out", str(tmp_path / "auto"))
    assert rows(tmp_path / "auto") == rows(tmp_path / "plain") and len(rows(tmp_path / "plain")) == 3
    assert steerlab.load(d, device_map="auto").device.type == "cpu"  # the only device here
    r = runner.invoke(app, [*args, "--device-map", "bogus", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "needs to be a device name" in r.output and not (tmp_path / "bad").exists()
