"""Adding a method is one new file (the class with its declared options) plus one benchmark recipe:
a toy intervention registered here appears in `steerlab interventions`, `steerlab fit`,
`generate --intervention` and `steerlab bench` with no other change."""

import json
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab.cli import app
from steerlab.edits import scale
from steerlab.experiments.recipes import RECIPES, register_recipe
from steerlab.generation import GenConfig, generate
from steerlab.hooks import edit
from steerlab.interventions import METHODS, Intervention, provenance, register
from steerlab.options import option
from tiny import flat, model_dir

SITE = "blocks.0.resid_post"


# --- the "new file": a method and its options --------------------------------------------------
@dataclass
class GainFit:
    gain: float = option(0.9, "factor the residual stream after block 0 is multiplied by", low=0.0, high=2.0,
                         unit="x activation")


@dataclass
class GainApply:
    mix: float = option(1.0, "share of the fitted change applied (0: none, 1: all of it)", low=0.0, high=1.0,
                        unit="share")


@dataclass
class ToyGain(Intervention):
    """Toy gain: multiply the residual stream after block 0 by a fitted factor."""

    gain: torch.Tensor
    meta: dict = field(default_factory=dict)
    method = "toy-gain"
    FitOptions = GainFit
    ApplyOptions = GainApply
    strength_option = "mix"

    @classmethod
    def fit(cls, model, data=None, gain: float = 0.9):
        return cls(torch.tensor(float(gain)), provenance(model, None, {"gain": gain}, sites=[SITE]))

    @classmethod
    def from_options(cls, model, o: GainFit):
        return cls.fit(model, None, o.gain)

    @contextmanager
    def apply(self, model, *, mix, strict: bool = True):
        self.check(model, strict)
        factor = 1.0 + mix * (float(self.gain) - 1.0)
        with edit(model, {SITE: scale(torch.full((model.d_model,), factor))}) as step:
            yield step

    def tensors(self):
        return {"gain": self.gain.reshape(1)}

    @classmethod
    def from_tensors(cls, tensors, meta):
        return cls(tensors["gain"][0], meta)


@pytest.fixture
def toy():
    register(ToyGain)
    # --- the "one recipe": two settings tried on validation, fitted at the default gain ---------
    register_recipe("toy-gain", settings=lambda iv, model, data, preset: [{"mix": 0.5}, {"mix": 1.0}],
                    fit=lambda cls, model, data, preset: cls.fit(model))
    yield ToyGain
    METHODS.pop("toy-gain", None)
    RECIPES.pop("toy-gain", None)


def test_a_registered_toy_method_appears_everywhere(tmp_path, toy):
    runner = CliRunner()
    d = model_dir(tmp_path)
    r = runner.invoke(app, ["interventions"])
    assert r.exit_code == 0 and "toy-gain" in r.output and "Toy gain" in r.output
    r = runner.invoke(app, ["interventions", "toy-gain"])
    assert r.exit_code == 0 and "gain" in r.output and "mix" in r.output and "share" in r.output
    f = tmp_path / "toy.safetensors"
    r = runner.invoke(app, ["fit", "toy-gain", "--out", str(f), "--model", d, "--gain", "0.5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["fit", "toy-gain", "--out", str(f), "--model", d, "--gain", "3"])
    assert r.exit_code == 2 and "gain must be in [0, 2]" in flat(r.output)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a first line\nanother line of text\n")
    out = tmp_path / "run"
    r = runner.invoke(app, ["generate", "--out", str(out), "--model", d, "--prompts", str(prompts),
                            "--max-new-tokens", "4", "--scorer", "profanity", "--intervention", str(f), "--alpha", "0.5"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    m = sl.load(d)
    iv = sl.interventions.load(f, m)
    with iv.apply(m, mix=0.5):  # the same in Python: generate --alpha sets the method's strength option
        hand = generate(m, ["a first line", "another line of text"], GenConfig(max_new_tokens=4), progress=False)
    assert [r_["continuation"] for r_ in rows] == [c[0] for c in hand]
    r = runner.invoke(app, ["generate", "--out", str(tmp_path / "no"), "--model", d, "--prompts", str(prompts),
                            "--intervention", str(f), "--apply-option", "mixx=1"])
    assert r.exit_code == 2 and "toy-gain's apply has no option 'mixx'; its options are: mix (" in flat(r.output)
    assert not (tmp_path / "no").exists()
    bench = tmp_path / "bench"
    r = runner.invoke(app, ["bench", "--out", str(bench), "--model", d, "--methods", "toy-gain", "--n-test", "4",
                            "--k", "1", "--n-val", "3", "--max-new-tokens", "3", "--scorer", "profanity"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((bench / "metrics.json").read_text())
    arm = {a["method"]: a for a in metrics["arms"]}["toy-gain"]
    assert arm["status"] == "ok" and [s["setting"] for s in arm["selection"]] == [{"mix": 0.5}, {"mix": 1.0}]


def test_the_benchmark_runs_the_detox_methods_only_by_default():
    from steerlab.experiments.recipes import bench_methods
    from steerlab.methods import BUILTIN

    # every built-in method either joins `steerlab bench` by default or is a known non-detox method
    assert set(bench_methods()) >= {"steering", "iti", "slim", "aura", "eigenshift", "selfcorrect"}
    assert not {"selfie-control", "selfie-rl"} & set(bench_methods())
    assert set(bench_methods()) <= set(BUILTIN) | {"toy"}
