"""The Intervention protocol: registry, files, and `steerlab fit` / `generate --intervention` on a tiny model."""

import json

import pytest
import torch
from typer.testing import CliRunner

import steerlab as sl
from steerlab import interventions as I
from steerlab.cli import app
from steerlab.generation import GenConfig, generate_run
from steerlab.scoring import get_scorer
from steerlab.steer import SteeringVector
from tiny import flat, model_dir, tiny_model

runner = CliRunner()
GOOD = ["what a lovely day", "thank you so much", "have a nice time", "you are kind"]
BAD = ["you stupid idiot", "shut up moron", "I hate you all", "get lost loser"]


def _texts(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(GOOD) + "\n")
    bad.write_text("\n".join(BAD) + "\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"line {i} of text" for i in range(6)) + "\n")
    return str(good), str(bad), str(prompts)


def test_registry_lists_and_fits_by_name(llama):
    assert "steering" in I.list_interventions()
    iv = I.fit("steering", llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    assert isinstance(iv, SteeringVector) and iv.sites == ["blocks.1.resid_post"]
    assert iv.describe().startswith("steering at blocks.1.resid_post") and "tiny-llama" in iv.describe()
    with pytest.raises(I.InterventionError, match="unknown intervention method 'nope'; choose one of .*steering"):
        I.fit("nope", llama, (GOOD, BAD))
    r = runner.invoke(app, ["interventions"])
    assert r.exit_code == 0 and "steering" in r.output


def test_cli_fit_then_generate_equals_python_apply(tmp_path):
    d = model_dir(tmp_path)
    good, bad, prompts = _texts(tmp_path)
    vec = tmp_path / "v.safetensors"
    r = runner.invoke(app, ["fit", "steering", "--out", str(vec), "--model", d, "--desirable", good,
                            "--undesirable", bad, "--layers", "1", "--positions", "last"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cli_run"
    args = ["generate", "--out", str(out), "--model", d, "--prompts", prompts, "-k", "2", "--sampling", "t1.0",
            "--max-new-tokens", "6", "--scorer", "profanity", "--intervention", str(vec), "--alpha", "8"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    cli_rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intervention"]["apply"] == {"alpha": 8.0} and cfg["intervention"]["method"] == "steering"
    assert "steering at blocks.1.resid_post" in json.loads((out / "record.json").read_text())["intervention"]
    # the same in Python: load the model and the vector, generate inside `with iv.apply(...)`
    m = sl.load(d)
    iv = I.load(vec, m)
    with iv.apply(m, alpha=8.0):
        py_rows = generate_run(m, sl.data.load_prompts(prompts), tmp_path / "py_run",
                               GenConfig(max_new_tokens=6, sampling="t1.0", k=2), scorer=get_scorer("profanity"),
                               progress=False)
    key = lambda r: (r["prompt_id"], r["sample"])  # noqa: E731
    assert sorted(map(key, cli_rows)) == sorted(map(key, py_rows)) and len(py_rows) == 12
    cli_by, py_by = {key(r): r for r in cli_rows}, {key(r): r for r in py_rows}
    assert all(cli_by[k]["continuation"] == py_by[k]["continuation"] for k in py_by)
    # and the intervention changed the text (against the same run without it)
    plain = generate_run(m, sl.data.load_prompts(prompts), tmp_path / "plain", GenConfig(max_new_tokens=6, sampling="t1.0", k=2), progress=False)
    assert sum(p["continuation"] != py_by[key(p)]["continuation"] for p in plain) >= 6


def test_bad_intervention_inputs_fail_cleanly_and_write_nothing(tmp_path):
    d, d_other = model_dir(tmp_path), model_dir(tmp_path, seed=3)
    good, bad, prompts = _texts(tmp_path)
    vec = tmp_path / "v.safetensors"
    assert runner.invoke(app, ["fit", "steering", "--out", str(vec), "--model", d, "--desirable", good,
                               "--undesirable", bad, "--layers", "1"]).exit_code == 0
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(vec.read_bytes()[:-9])
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    cases = [(vec, d_other, "fitted on model"), (cut, d, "truncated"), (foreign, d, "not a steerlab intervention"),
             (tmp_path / "missing.safetensors", d, "not found")]
    for i, (f, model, msg) in enumerate(cases):
        out = tmp_path / f"run{i}"
        r = runner.invoke(app, ["generate", "--out", str(out), "--model", model, "--prompts", prompts,
                                "--max-new-tokens", "3", "--scorer", "profanity", "--intervention", str(f)])
        assert r.exit_code == 2 and msg in flat(r.output), (f, r.output)
        assert "Traceback" not in r.output and not out.exists()
    r = runner.invoke(app, ["fit", "nope", "--out", str(vec)])
    assert r.exit_code == 2 and "unknown intervention method 'nope'; choose one of" in r.output
    r = runner.invoke(app, ["fit", "steering", "--out", str(tmp_path), "--model", d])
    assert r.exit_code == 2 and "is a directory" in flat(r.output)
    r = runner.invoke(app, ["fit", "steering", "--out", str(vec), "--model", d, "--layers", "x"])
    assert r.exit_code == 2 and "comma-separated list of ints" in flat(r.output)
    r = runner.invoke(app, ["generate", "--out", str(tmp_path / "r"), "--model", d, "--prompts", prompts, "--alpha", "2"])
    assert r.exit_code == 2 and "--alpha and --apply-option need --intervention" in flat(r.output) and not (tmp_path / "r").exists()
    r = runner.invoke(app, ["generate", "--out", str(tmp_path / "r"), "--model", d, "--prompts", prompts, "--n", "-1"])
    assert r.exit_code == 2 and not (tmp_path / "r").exists()


def test_save_writes_usual_file_mode(tmp_path, llama):
    import os
    import stat

    old = os.umask(0o022)
    try:
        f = SteeringVector.fit(llama, (GOOD, BAD), sites="blocks.0.resid_post").save(tmp_path / "v.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no stray temporary file


TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_selfcorrection_round_is_a_prompt_side_intervention(tmp_path):
    from steerlab.generation import generate_batch
    from steerlab.protocols.correction import SelfCorrection
    from steerlab.protocols.selfcorrect import dialogue, parse_completion

    m = tiny_model("llama")
    m.tok.chat_template = TEMPLATE
    iv = I.fit("selfcorrect", m, None, instruction="weak_detox")
    assert isinstance(iv, SelfCorrection) and "selfcorrect" in iv.describe()
    cfg = GenConfig(max_new_tokens=5, sampling="t1.0", k=2, batch_size=4)
    prompts = ["you are a", "the weather is", "I think that"]
    rows = generate_run(m, prompts, tmp_path / "run", cfg, intervention=iv, progress=False)
    base = generate_run(m, prompts, tmp_path / "base", cfg, progress=False)
    # recompute by hand: round 1 is the unsteered batch, round 2 answers the correction dialogue
    by = {(r["prompt_id"], r["sample"]): r["continuation"] for r in rows}
    first = {(b["prompt_id"], b["sample"]): b["continuation"] for b in base}
    from steerlab.generation import generation_batches, prompt_ids_texts
    ids, texts = prompt_ids_texts(prompts)
    for batch in generation_batches(m, ids, texts, cfg):
        dials = [dialogue(texts[i], [f"Completion: {texts[i]}{first[(ids[i], s)]}"], "weak_detox")
                 for i in batch for s in range(cfg.k)]
        rev = generate_batch(m, dials, GenConfig(max_new_tokens=5, sampling="t1.0", k=1, chat=True, batch_size=4),
                             [f"{ids[i]}|correction|{s}" for i in batch for s in range(cfg.k)])
        for j, (i, s) in enumerate((i, s) for i in batch for s in range(cfg.k)):
            want = parse_completion(rev[j][0])[0]
            want = want[len(texts[i]):] if want.startswith(texts[i]) else want
            assert by[(ids[i], s)] == want
    f = iv.save(tmp_path / "sc.safetensors")
    back = I.load(f, m)
    assert isinstance(back, SelfCorrection) and back.meta["options"] == {"instruction": "weak_detox", "opening": "opening"}
    with pytest.raises(I.InterventionError, match="opening instruction"):
        I.fit("selfcorrect", m, None, instruction="opening")
    plain = tiny_model("llama")
    with pytest.raises(I.InterventionError, match="no chat template"):
        I.fit("selfcorrect", plain, None)


def test_cli_apply_options_reach_the_intervention(tmp_path):
    d = model_dir(tmp_path)
    good, bad, prompts = _texts(tmp_path)
    vec = tmp_path / "v.safetensors"
    assert runner.invoke(app, ["fit", "steering", "--out", str(vec), "--model", d, "--desirable", good,
                               "--undesirable", bad, "--layers", "1"]).exit_code == 0
    out = tmp_path / "cli"
    r = runner.invoke(app, ["generate", "--out", str(out), "--model", d, "--prompts", prompts, "--max-new-tokens", "5",
                            "--scorer", "none", "--intervention", str(vec), "--alpha", "1",
                            "--apply-option", "mode=ablate", "--apply-option", "where=generated"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["intervention"]["apply"] == {
        "mode": "ablate", "where": "generated", "alpha": 1.0}
    m = sl.load(d)
    with I.load(vec, m).apply(m, alpha=1.0, mode="ablate", where="generated"):
        py = generate_run(m, sl.data.load_prompts(prompts), tmp_path / "py", GenConfig(max_new_tokens=5), progress=False)
    cli = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["continuation"] for r in cli) == sorted(r["continuation"] for r in py)
    r = runner.invoke(app, ["generate", "--out", str(tmp_path / "x"), "--model", d, "--prompts", prompts,
                            "--intervention", str(vec), "--apply-option", "mode"])
    assert r.exit_code == 2 and "is not KEY=VALUE" in flat(r.output) and not (tmp_path / "x").exists()


def test_a_run_started_with_a_fitted_intervention_resumes_with_its_saved_file(tmp_path, llama):
    iv = I.fit("steering", llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    cfg = GenConfig(max_new_tokens=4, sampling="t1.0", k=2)
    rows = generate_run(llama, GOOD + BAD, tmp_path / "run", cfg, intervention=iv, apply_options={"alpha": 3.0},
                        progress=False)
    f = tmp_path / "run" / "results.jsonl"
    f.write_text("\n".join(f.read_text().splitlines()[:5]) + "\n")  # interrupted
    back = I.load(iv.save(tmp_path / "v.safetensors"), llama)
    assert back.fingerprint() == iv.fingerprint()
    again = generate_run(llama, GOOD + BAD, tmp_path / "run", cfg, intervention=back, apply_options={"alpha": 3.0},
                         progress=False)
    assert again == rows


def test_every_method_declares_its_options_once_and_lists_them():
    """Each method's apply takes exactly its declared ApplyOptions (no defaults of its own: the declaration
    is the one place), every option has a meaning, and `steerlab interventions METHOD` prints them all."""
    import inspect

    from steerlab.options import specs

    for name, cls in I.METHODS.items():
        raw = inspect.unwrap(cls.__dict__.get("apply") or cls.apply)
        params = {p.name: p for p in inspect.signature(raw).parameters.values()} if "apply" in cls.__dict__ else {}
        declared = {s.name for s in specs(cls.ApplyOptions)}
        if params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            assert set(params) - {"self", "model", "strict"} == declared, name
            assert all(params[n].default is inspect.Parameter.empty for n in declared), name
        for s in [*specs(cls.FitOptions), *specs(cls.ApplyOptions)]:
            assert s.help, (name, s.name)
        if cls.strength_option is not None:
            assert cls.strength_option in declared, name
        r = runner.invoke(app, ["interventions", name])
        assert r.exit_code == 0, r.output
        for s in [*specs(cls.FitOptions), *specs(cls.ApplyOptions)]:
            assert s.name.replace("_", "-") in r.output, (name, s.name)
    r = runner.invoke(app, ["interventions", "steering"])
    assert "x typical norm" in flat(r.output) and "x head std" in flat(runner.invoke(app, ["interventions", "iti"]).output)


def test_apply_options_are_checked_and_strength_is_in_typical_norm_units(llama):
    site = "blocks.1.resid_post"
    sv = SteeringVector.fit(llama, GOOD, BAD, site, positions="mean_skip_first")
    with pytest.raises(I.InterventionError, match=r"steering's apply has no option 'alhpa'; its options are: alpha \("):
        with sv.apply(llama, alhpa=2.0):
            pass
    with pytest.raises(I.InterventionError, match="unknown where 'sometimes'"):
        with sv.apply(llama, where="sometimes"):
            pass
    with pytest.raises(I.InterventionError, match="alpha: .lots. is not a float"):
        with sv.apply(llama, alpha="lots"):
            pass
    # strength s adds a vector of norm s x the typical token-state norm of the fitting texts
    caps = sl.capture(llama, GOOD + BAD, site, "all")
    from steerlab.positions import after_first
    typical = float(caps[site][after_first(caps.mask)].norm(dim=-1).median())
    assert sv.meta["typical_norm"][site] == pytest.approx(typical, rel=1e-6)
    v = sv.directions[site]
    with sv.apply(llama, strength=0.3):
        a = sl.capture(llama, ["hello there"], site, "all")[site]
    with sv.apply(llama, alpha=0.3 * typical / float(v.norm())):
        b = sl.capture(llama, ["hello there"], site, "all")[site]
    torch.testing.assert_close(a, b)
    with pytest.raises(I.InterventionError, match="mode 'ablate' takes alpha"):
        with sv.apply(llama, strength=0.3, mode="ablate"):
            pass


def test_python_fit_defaults_equal_the_cli(llama):
    """interventions.fit("steering") and SteeringVector.fit pool positions as `steerlab fit steering` does."""
    from steerlab.options import specs

    cli = {s.name: s.default for s in specs(I.get("steering").FitOptions)}
    a = I.fit("steering", llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    b = SteeringVector.fit(llama, (GOOD, BAD), sites=["blocks.1.resid_post"])
    assert a.meta["positions"] == b.meta["positions"] == cli["positions"] == "mean_skip_first"
