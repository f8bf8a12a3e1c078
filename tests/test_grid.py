"""Candidate grids in batched generations (steerlab.grid, Intervention.apply_rows): for every built-in
method the batched grid writes the same tokens, scores and run directories as one generate_run per
setting; each row gets its own setting; bad settings and row indices are clear errors."""

import json
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from steerlab.edits import scale
from steerlab.experiments.recipes import recipe_for
from steerlab.explain import probes as pr
from steerlab.generation import GenConfig, generate_ids, generate_run, prompt_ids_texts
from steerlab.grid import generate_grid
from steerlab.hooks import edit
from steerlab.interventions import Intervention, InterventionError
from steerlab.options import option
from steerlab.scoring import get_scorer
from steerlab.steer.aura import AurA
from steerlab.steer.eigenshift import EigenShift
from steerlab.steer.iti import ITI
from steerlab.steer.slim import SLIM
from steerlab.steer.vector import SteeringVector
from tiny import tiny_model

GOOD = ["what a lovely day", "thank you so much", "have a nice time", "you are kind", "the sun is out",
        "we love this", "so happy now", "a gentle breeze"]
BAD = ["you stupid idiot", "shut up moron", "I hate you all", "get lost loser", "you dumb fool",
       "what a jerk", "damn you", "ugly and dumb"]
PROMPTS = ["hello world", "a", "The quick brown fox!", "steer me", "you are", "xyz 12"]
CFG = GenConfig(max_new_tokens=8, sampling="t1.0", k=2, seed=3, batch_size=4)
WORDS = ["calm", "kind", "warm", "nice", "rude", "vile", "mean", "nasty"]


def _labelled():
    texts = [f"{WORDS[i % 8]} {i} {WORDS[(i * 3) % 8]}" for i in range(60)]
    return pr.labelled_from_texts(texts, [int(t.split()[0] in WORDS[4:]) for t in texts], validation=0.3, seed=0)


def _fitted(method: str, m):
    """A fitted intervention on the tiny model and the benchmark recipe's candidate settings for it."""
    if method == "steering":
        iv = SteeringVector.fit(m, (GOOD, BAD), sites=["blocks.0.resid_post", "blocks.1.resid_post"])
    elif method == "iti":
        iv = ITI.fit(m, _labelled(), k=3)
    elif method == "slim":
        iv = SLIM.fit(m, pr.probe_data(m, _labelled()), layer=1, epochs=60, shrink=0.2)
    elif method == "aura":
        iv = AurA.fit(m, (GOOD, BAD))
    else:
        g = torch.Generator().manual_seed(0)
        tox = torch.randn(24, m.d_model, generator=g) + torch.linspace(-2, 2, m.d_model)
        iv = EigenShift.fit(m, (tox, torch.randn(24, m.d_model, generator=g)), k=8, alpha=0.0, rank="t")
    return iv, recipe_for(method).settings(iv, m, None, "quick")


def _rows(d):
    return [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["steering", "iti", "slim", "aura", "eigenshift"])
def test_batched_grid_equals_one_setting_at_a_time(tmp_path, method):
    m = tiny_model("llama")
    iv, settings = _fitted(method, m)
    assert any(len(g) > 1 for g in iv.grid_groups(settings)), "the recipe's settings share no batch"
    scorer = get_scorer("default")
    n = len(settings)
    grid = generate_grid(m, PROMPTS, [tmp_path / "grid" / str(i) for i in range(n)], CFG, iv, settings,
                         scorer=scorer, progress=False)
    one = [generate_run(m, PROMPTS, tmp_path / "one" / str(i), CFG, scorer=scorer, intervention=iv,
                        apply_options=s, progress=False) for i, s in enumerate(settings)]
    assert grid == one  # every row: prompt, sample, continuation, toxicity and every score, in order
    for i in range(n):  # the same run identity and rows in the same order, so each resumes the other
        a, b = tmp_path / "grid" / str(i), tmp_path / "one" / str(i)
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
        assert _rows(a) == _rows(b)
        assert json.loads((a / "record.json").read_text())["n_rows"] == len(PROMPTS) * CFG.k
    texts = {tuple(r["continuation"] for r in rows) for rows in grid}
    assert len(texts) > 1, "the settings should not all give the same text"


def _plain_and_rows(m, iv, settings, texts):
    keys = prompt_ids_texts(texts)[0]
    plain = generate_ids(m, texts, CFG, keys)
    rows = torch.arange(len(settings)).repeat_interleave(len(texts) * CFG.k)
    with iv.apply_rows(m, settings, rows):
        both = generate_ids(m, texts * len(settings), CFG, keys * len(settings))
    return plain, both


@pytest.mark.parametrize("method,null,strong", [
    ("steering", {"alpha": 0.0}, {"alpha": 8.0}), ("iti", {"alpha": 0.0}, {"alpha": 30.0}),
    ("slim", {"kappa": 0.0}, {"kappa": 20.0}), ("eigenshift", {"alpha": 1.0}, {"alpha": 0.0, "k": 8})])
def test_each_row_gets_its_own_setting(method, null, strong):
    m = tiny_model("llama")
    iv, _ = _fitted(method, m)
    texts = PROMPTS[:3]
    plain, both = _plain_and_rows(m, iv, [null, strong], texts)
    n = len(texts) * CFG.k
    assert torch.equal(both[:n], plain)  # strength 0 (alpha 1 for EigenShift): the unsteered rows, bit for bit
    with iv.apply(m, **strong):
        alone = generate_ids(m, texts, CFG, prompt_ids_texts(texts)[0])
    assert torch.equal(both[n:], alone) and not torch.equal(alone, plain)


def test_settings_of_other_sites_and_modes_leave_a_row_alone():
    """Steering settings on other sites and modes (clamp, gated, generated-only) share the batch
    with an alpha-0 row, which stays the unsteered row."""
    m = tiny_model("llama")
    iv, settings = _fitted("steering", m)
    others = [s for s in settings if s.get("mode") in ("clamp", "gated") or s.get("where")]
    plain, rows = _plain_and_rows(m, iv, [{"alpha": 0.0}] + others, PROMPTS[:2])
    assert torch.equal(rows[:len(plain)], plain)


def test_unknown_option_is_named_and_nothing_is_written(tmp_path):
    m = tiny_model("llama")
    iv, _ = _fitted("steering", m)
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(InterventionError, match="has no option 'alpah'; its options are: alpha"):
        generate_grid(m, PROMPTS, dirs, CFG, iv, [{"alpha": 1.0}, {"alpah": 2.0}], progress=False)
    # a setting the method refuses only when applied (strength needs add or gated): also before writing
    with pytest.raises(InterventionError, match="mode 'clamp' takes alpha"):
        generate_grid(m, PROMPTS, dirs, CFG, iv, [{"alpha": 1.0}, {"strength": 0.1, "mode": "clamp"}], progress=False)
    assert not tmp_path.joinpath("a").exists() and not tmp_path.joinpath("b").exists()
    with pytest.raises(Exception, match="one distinct run directory per setting"):
        generate_grid(m, PROMPTS, [tmp_path / "a"] * 2, CFG, iv, [{"alpha": 1.0}, {"alpha": 2.0}], progress=False)


def test_row_setting_must_match_the_batch():
    m = tiny_model("llama")
    iv, _ = _fitted("iti", m)
    texts = PROMPTS[:2]  # 4 rows with k=2
    with pytest.raises(Exception, match=r"row_setting has 3 entries \(one per batch row\) but the forward call "
                                        r"has 4 rows"):
        with iv.apply_rows(m, [{"alpha": 1.0}, {"alpha": 2.0}], torch.tensor([0, 1, 0])):
            generate_ids(m, texts, CFG)
    with pytest.raises(InterventionError, match=r"indices 0\.\.2 but there are 2 settings"):
        iv.apply_rows(m, [{"alpha": 1.0}, {"alpha": 2.0}], torch.tensor([0, 2, 1, 0]))
    with pytest.raises(InterventionError, match="1-D integer tensor"):
        iv.apply_rows(m, [{"alpha": 1.0}], torch.tensor([0.0, 0.0]))
    with pytest.raises(InterventionError, match="iti's apply has no option 'kappa'"):
        iv.apply_rows(m, [{"kappa": 1.0}], torch.tensor([0, 0]))


@dataclass
class _Mix:
    mix: float = option(1.0, "share of the change applied", low=0.0, high=1.0)


class _Gain(Intervention):
    """A method without per-row settings: the residual stream after block 0 times (1 - mix / 2)."""

    method, ApplyOptions, meta = "gain", _Mix, {"sites": ["blocks.0.resid_post"]}

    @classmethod
    def fit(cls, model, data=None):
        return cls()

    @contextmanager
    def apply(self, model, *, mix, strict: bool = True):
        with edit(model, {"blocks.0.resid_post": scale(1.0 - mix / 2)}) as step:
            yield step

    def tensors(self):
        return {}

    @classmethod
    def from_tensors(cls, tensors, meta):
        return cls()


def test_a_method_without_per_row_settings_generates_them_apart(tmp_path):
    m, iv = tiny_model("llama"), _Gain()
    settings = [{"mix": 0.0}, {"mix": 1.0}, {}]
    assert iv.grid_groups(settings) == [[0], [1], [2]]
    with pytest.raises(InterventionError, match=r"rows of settings \[0, 1\] must be generated apart"):
        iv.apply_rows(m, settings, torch.tensor([0, 1]))
    with pytest.raises(InterventionError, match="gain's apply has no option 'gain'"):
        iv.apply_rows(m, [{"gain": 1.0}], torch.tensor([0, 0]))
    texts = PROMPTS[:2]
    with iv.apply_rows(m, settings, torch.ones(4, dtype=torch.long)), torch.no_grad():  # one setting: its apply
        one = generate_ids(m, texts, CFG)
    with iv.apply(m, mix=1.0):
        assert torch.equal(one, generate_ids(m, texts, CFG))
    grid = generate_grid(m, PROMPTS, [tmp_path / str(i) for i in range(3)], CFG, iv, settings, progress=False)
    assert grid[1] == generate_run(m, PROMPTS, tmp_path / "one", CFG, intervention=iv, apply_options=settings[1],
                                   progress=False)


def test_rerun_resumes_and_reuses_complete_directories(tmp_path):
    m = tiny_model("llama")
    iv, settings = _fitted("aura", m)
    dirs = [tmp_path / str(i) for i in range(len(settings))]
    full = generate_grid(m, PROMPTS, dirs, CFG, iv, settings, progress=False)
    # as if killed: one directory lost its last batch (a torn line too), another never started
    lines = (dirs[1] / "results.jsonl").read_text().splitlines(keepends=True)
    (dirs[1] / "results.jsonl").write_text("".join(lines[:-4]) + lines[-4][:10])
    for f in dirs[2].iterdir():
        f.unlink() if f.is_file() else None
    before = {i: (dirs[i] / "results.jsonl").read_bytes() for i in (0, 3)}
    again = generate_grid(m, PROMPTS, dirs, CFG, iv, settings, progress=False)
    assert again == full
    assert all((dirs[i] / "results.jsonl").read_bytes() == before[i] for i in (0, 3))  # complete: untouched
    # generate_run reads a grid's directory as its own run: nothing to generate, the same rows
    assert generate_run(m, PROMPTS, dirs[1], CFG, intervention=iv, apply_options=settings[1], progress=False) == full[1]
