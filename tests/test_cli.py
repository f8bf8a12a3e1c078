"""The command line, run in-process on a tiny model saved to disk."""

from typer.testing import CliRunner

from steerlab.cli import app
from tiny import tiny_model

runner = CliRunner()


def _model_dir(tmp_path):
    m = tiny_model("llama")
    d = tmp_path / "tiny"
    m.hf.save_pretrained(d)
    m.tok.save_pretrained(d)
    return str(d)


def test_lens_cli(tmp_path):
    d = _model_dir(tmp_path)
    r = runner.invoke(app, ["lens", "hello", "--model", d, "-k", "2", "--layers", "0,-1"])
    assert r.exit_code == 0, r.output
    assert "logit lens" in r.output and "top 2" in r.output
    rows = [line for line in r.output.splitlines() if line.strip().startswith(("│     0", "│     2"))]
    assert len(rows) == 2


def test_lens_cli_errors(tmp_path):
    d = _model_dir(tmp_path)
    r = runner.invoke(app, ["lens", "hello", "--model", d, "--layers", "9"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = runner.invoke(app, ["lens", "hello", "--model", str(tmp_path / "nope.gguf")])
    assert r.exit_code == 2 and "GGUF file not found" in r.output


def test_info_and_help(tmp_path):
    d = _model_dir(tmp_path)
    r = runner.invoke(app, ["info", "--model", d])
    assert r.exit_code == 0 and "fingerprint" in r.output and "llama" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "lens" in r.output
