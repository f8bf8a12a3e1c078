"""Progress that reads in a log: plain lines (no carriage return, no cursor movement) when output is not
a terminal, a named bar in one; no stray transformers bars."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steerlab.progress import Progress, mode, progress_iter
from tiny import tiny_model


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_in_a_log(monkeypatch):
    monkeypatch.delenv("STEERLAB_PROGRESS", raising=False)
    out = io.StringIO()
    with Progress(25, "generate test/unsteered", unit="row", stream=out) as p:
        for _ in range(5):
            p.update(5)
        p.note("scoring")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "[generate test/unsteered] 25 rows"
    # a line per finished tenth (every ceil(25/10) = 3 rows: crossed at 5, 10, 15, 20), then the end
    assert [ln.split("] ")[1].split(" ")[0] for ln in lines[1:5]] == ["5/25", "10/25", "15/25", "20/25"]
    assert lines[5] == "[generate test/unsteered] scoring"
    assert lines[-1].startswith("[generate test/unsteered] done: 25/25 rows in ")
    assert len(lines) == 7


def test_modes(monkeypatch):
    monkeypatch.delenv("STEERLAB_PROGRESS", raising=False)
    assert mode(io.StringIO()) == "plain" and mode(_Tty()) == "bar"
    monkeypatch.setenv("STEERLAB_PROGRESS", "off")
    out = io.StringIO()
    assert list(progress_iter(range(3), "x")) == [0, 1, 2] and mode(_Tty()) == "off"
    Progress(3, "x", stream=out).update(3)
    assert out.getvalue() == ""
    monkeypatch.setenv("STEERLAB_PROGRESS", "plain")
    assert mode(_Tty()) == "plain"


def test_bar_in_a_terminal_names_the_phase(monkeypatch):
    monkeypatch.delenv("STEERLAB_PROGRESS", raising=False)
    tty = _Tty()
    with Progress(4, "capture", unit="batch", stream=tty) as p:
        p.update(4)
    assert "capture" in tty.getvalue() and "\r" in tty.getvalue()  # a tqdm bar, redrawn in place


def test_generate_into_a_pipe_reads_as_a_log(tmp_path):
    """`steerlab generate` with its output in a pipe: phase lines, no carriage return, no bars."""
    m = tiny_model("llama")
    d = tmp_path / "model"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i} says" for i in range(24)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("STEERLAB_PROGRESS", None)
    r = subprocess.run([sys.executable, "-m", "steerlab", "generate", "--out", str(tmp_path / "run"), "-m", str(d),
                        "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", "2", "--scorer", "none"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert "\r" not in log and "\x1b[" not in log and "Loading weights" not in log
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[generate ")]
    assert lines[0].endswith("] 24 rows") and lines[-1].split("] ")[1].startswith("done: 24/24 rows")
    assert 5 <= len(lines) <= 12  # a line per finished tenth of the work, not per row
    assert "24 continuations" in r.stdout


@pytest.mark.parametrize("total", [0, 1, 7])
def test_small_totals(total):
    out = io.StringIO()
    with Progress(total, "p", stream=out) as p:
        for _ in range(total):
            p.update(1)
    assert out.getvalue().splitlines()[-1].startswith(f"[p] done: {total}/{total}")
