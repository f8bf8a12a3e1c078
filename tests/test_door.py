"""Issue 30: every value checked at the door. One test per kind of failure the adversarial probe
found: silent wrong results (non-finite values), tracebacks, leaked secrets, late validation, data
loss on a full disk. Each test failed on main before the change."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch

import steerlab as sl
from steerlab import validate as V
from steerlab.generation import GenConfig, generate, generate_run
from steerlab.runs import RunDir, write_json
from tiny import PROMPTS, flat

SITE = "blocks.1.resid_post"


# --- silent wrong results: non-finite values ---------------------------------------------------------
@pytest.mark.parametrize("sampling", ["greedy", "t1.0"])
def test_nonfinite_edit_stops_generation_naming_the_site(llama, sampling):
    """An edit that produces inf / NaN stops generation with the site named (before: greedy decoding
    produced arbitrary tokens, exit 0; sampling failed with IndexError inside the row sampler)."""
    with sl.edit(llama, {SITE: lambda a, s: a * float("inf")}), pytest.raises(V.NonFiniteError) as e:
        generate(llama, PROMPTS[:2], GenConfig(max_new_tokens=3, sampling=sampling))
    assert "NaN or infinite logits at decoding step 0" in str(e.value) and SITE in str(e.value)
    # a healthy edit at one site and an overflowing one at another: only the culprit is named
    with sl.edit(llama, {"blocks.0.resid_post": lambda a, s: a * 1.0,
                         "blocks.2.resid_post": lambda a, s: a * float("nan")}), pytest.raises(V.NonFiniteError) as e:
        generate(llama, PROMPTS[:2], GenConfig(max_new_tokens=3, sampling=sampling))
    assert "blocks.2.resid_post" in str(e.value) and "blocks.0.resid_post" not in str(e.value)
    # after the error, generation is healthy again (no hook or flag left behind)
    assert generate(llama, PROMPTS[:2], GenConfig(max_new_tokens=3)) == generate(llama, PROMPTS[:2],
                                                                                 GenConfig(max_new_tokens=3))


def test_nonfinite_strength_or_overflow_is_refused_before_the_run_directory(tmp_path, llama):
    """``alpha=nan`` / ``inf`` are refused at apply; an alpha that overflows the forward is caught by
    the probe before ``config.json`` exists, naming the intervention (before: exit 0, empty
    continuations scored as non-toxic, metrics.json with bare NaN)."""
    from steerlab.steer import SteeringVector

    sv = SteeringVector({SITE: torch.full((32,), 10.0)})
    for bad, why in ((float("nan"), "alpha must be a finite number, got nan"),
                     (float("inf"), "alpha must be a finite number, got inf"), ("abc", "'abc' is not a float")):
        with pytest.raises(sl.SteerlabError, match=why):
            generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=3), intervention=sv,
                         apply_options={"alpha": bad}, progress=False)
        assert not (tmp_path / "r").exists()
    # the edit builders check their strength too (Python API without the typed options)
    with pytest.raises(V.ValidationError, match=r"strength \(alpha\) must be a finite number, got nan"):
        with sl.edit(llama, {SITE: sl.add(torch.ones(32), float("nan"))}):
            pass
    with pytest.raises(V.NonFiniteError, match=rf"steering intervention at {SITE} applied with alpha=3e\+38: .*"
                                               rf"NaN or infinite logits.*{SITE}"):
        generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=3, sampling="t1.0"), intervention=sv,
                     apply_options={"alpha": 3e38}, progress=False)
    assert not (tmp_path / "r").exists()
    # late validation: an apply option the method refuses fails before anything is written, so the
    # corrected command then runs (before: "differs in: intervention")
    with pytest.raises(sl.SteerlabError, match="unknown mode 'nope'"):
        generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=3), intervention=sv,
                     apply_options={"mode": "nope"}, progress=False)
    assert not (tmp_path / "r").exists()
    rows = generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=3), intervention=sv,
                        apply_options={"alpha": 0.5}, progress=False)
    assert len(rows) == len(PROMPTS)


def test_nonfinite_intervention_files_are_refused_at_load(tmp_path, llama):
    """A NaN factor in an AurA file, an out-of-range EigenShift index: refused at load with the
    tensor named (before: the NaN factor was accepted; the index failed later with IndexError)."""
    from safetensors.torch import load_file, save_file

    from steerlab import interventions as I
    from steerlab.steer.aura import AurA
    from steerlab.steer.eigenshift import EigenShift, EigenShiftError

    iv = AurA({"blocks.0.mlp.act": torch.linspace(0.2, 1.0, 48)}, meta={"layers": [0]})
    good = iv.save(tmp_path / "a.safetensors")
    tensors = load_file(good)
    tensors["factor.blocks.0.mlp.act"][3] = float("nan")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(I.InterventionError, match=r"NaN or infinite values in factor\.blocks\.0\.mlp\.act"):
        I.load(tmp_path / "nan.safetensors")
    with pytest.raises(EigenShiftError, match=r"indices must lie in \[0, 32\).*got 0\.\.99"):
        EigenShift(torch.tensor([0, 99]), torch.ones(2), torch.ones(2), 0.1, {"d_model": 32})
    with pytest.raises(I.InterventionError, match="non-empty string or path, got NoneType"):
        I.load(None)


def test_metrics_json_never_holds_bare_nan(tmp_path):
    path = write_json(tmp_path / "m.json", {"ppl": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"ppl": None, "x": [1.0, None],
                                                                                   "ok": 0.5}


# --- data loss: a full disk mid-run, then resume -------------------------------------------------------
def test_full_disk_mid_run_is_one_error_and_resumes_identically(tmp_path, llama, monkeypatch):
    """ENOSPC on the third batch's append: a one-line RunError, the file cut back to whole rows;
    rerunning the same call after 'freeing the disk' gives rows identical to an uninterrupted run."""
    from steerlab.runs import RunError
    from steerlab.scoring import get_scorer

    prompts = [f"prompt number {i}" for i in range(10)]
    cfg = GenConfig(max_new_tokens=4, sampling="t1.0", k=2, batch_size=4)
    sc = get_scorer("profanity")
    want = generate_run(llama, prompts, tmp_path / "whole", cfg, scorer=sc, progress=False)

    real_write, calls = os.write, {"n": 0}

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            calls["n"] += 1
            if calls["n"] == 3:
                real_write(fd, bytes(data)[:25])  # part of the batch reaches the disk, then it is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(RunError, match=r"cannot write results to .*results\.jsonl: No space left on device; free "
                                       r"some space and rerun the same command") as e:
        generate_run(llama, prompts, tmp_path / "cut", cfg, scorer=sc, progress=False)
    assert "\n" not in str(e.value)
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(x) for x in lines)  # two whole batches of 2 prompts x 2 samples
    monkeypatch.setattr(os, "write", real_write)
    got = generate_run(llama, prompts, tmp_path / "cut", cfg, scorer=sc, progress=False)
    assert got == want


def test_filesystem_faults_are_one_line_errors(tmp_path, monkeypatch):
    """A file where the run directory should be, or where its parent should be; a read-only
    directory (simulated: this suite may run as root, which ignores permission bits)."""
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(sl.SteerlabError, match="exists and is not a directory"):
        RunDir(blocker, {})
    with pytest.raises(sl.SteerlabError, match="cannot create run directory"):
        RunDir(blocker / "run", {})
    with pytest.raises(V.ValidationError, match="is a file, not a directory"):
        V.output_file(blocker / "sub" / "x.html")
    with pytest.raises(V.ValidationError, match="must be a directory path, got an empty string"):
        V.output_dir("")
    with pytest.raises(V.ValidationError, match="is a directory; give a file path"):
        V.output_file(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode, **k))
    (tmp_path / "ro").mkdir()
    with pytest.raises(V.ValidationError, match=r"ro is not writable \(read-only or permission denied\)"):
        V.output_file(tmp_path / "ro" / "v.safetensors")
    with pytest.raises(V.ValidationError, match="not writable"):
        V.output_dir(tmp_path / "ro")
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(sl.SteerlabError, match="cannot use run directory .*Read-only file system"):
        RunDir(tmp_path / "ro", {})


# --- leaks: keys never shown --------------------------------------------------------------------------
KEY = "AIzaSyD-s3cret-KEY-0123456789abcdefXYZ"


def _no_key(e: BaseException, *keys: str) -> None:
    seen = [e]
    while seen[-1].__cause__ or seen[-1].__context__:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    for x in seen:
        for text in (str(x), repr(x)):
            assert not any(k in text for k in keys), text


def test_scorer_specs_and_options_never_echo_a_key():
    """``--scorer perspective:KEY`` and ``--scorer-option api_key:KEY`` (before: echoed in the error)."""
    from steerlab.scoring import ScorerError, get_scorer, scorer_from_spec

    with pytest.raises(ScorerError, match=r"'perspective:\*\*\*' \(NAME:VALUE\) is not valid") as e:
        scorer_from_spec(f"perspective:{KEY}")
    _no_key(e.value, KEY)
    with pytest.raises(ScorerError, match=r"malformed option 'api_key:\*\*\*'") as e:
        scorer_from_spec("perspective", [f"api_key:{KEY}"])
    _no_key(e.value, KEY)
    # a key inside the endpoint's path, after a 'key' segment or as a token-like segment
    for endpoint in (f"http://example.com/v1/key/{KEY}/analyze", f"http://example.com/{KEY}/analyze",
                     f"http://example.com/v1;token={KEY}"):
        with pytest.raises(ScorerError, match="plain http") as e:
            get_scorer("perspective", api_key="other-key", endpoint=endpoint)
        _no_key(e.value, KEY, "other-key")
    # an ill-typed option is a one-line ScorerError, the key masked (before: TypeError traceback)
    with pytest.raises(ScorerError, match=r"could not be built.*TypeError") as e:
        get_scorer("perspective", api_key=KEY, attributes=5)
    _no_key(e.value, KEY)


def test_urls_are_redacted_and_labeller_urls_validated():
    from steerlab.explain.ffn import LabellerError, OpenAILabeller

    shown = V.redact(f"failed https://bob:{KEY}@host.example/v1/key/{KEY}/x?key={KEY}#frag and api_key={KEY}")
    assert KEY not in shown and "https://***@host.example/v1/key/***/x?key=***#***" in shown
    assert V.redact_url("https://api.example.com/v1/chat/completions") == "https://api.example.com/v1/chat/completions"
    for url, why in [("file:///etc", "scheme 'file'"), ("ftp://h/v1", "scheme 'ftp'"), ("", "non-empty URL"),
                     (f"http://user:{KEY}@localhost:8000/v1", "user name or password"),
                     ("http://labeller.example.com/v1", "plain http to 'labeller.example.com'")]:
        with pytest.raises(LabellerError, match=re.escape(why)) as e:
            OpenAILabeller(url, "m", api_key=KEY)
        _no_key(e.value, KEY)
    OpenAILabeller("http://labeller.example.com/v1", "m")  # no key sent: plain http is allowed
    lab = OpenAILabeller("http://127.0.0.1:9/v1", "m", api_key=KEY)  # port 9: nothing listens
    with pytest.raises(LabellerError, match=r"labeller endpoint http://127\.0\.0\.1:9/v1/chat/completions failed") as e:
        lab.label(["alpha", "beta"])
    _no_key(e.value, KEY)


# --- the run's identity: everything that changes its numbers ----------------------------------------
def test_scorer_options_are_part_of_the_run_identity(tmp_path, llama):
    """A resume with another scorer option (endpoint, threshold...) is refused like any changed option;
    secret options are not recorded (before: the config held only the scorer's name, and a resume with
    another endpoint mixed two scorers' rows)."""
    from steerlab.runs import RunError
    from steerlab.scoring import Scorer, get_scorer, register_scorer, scorer_identity

    class Const(Scorer):
        name, attributes = "door-const", ["toxicity"]

        def __init__(self, level: float = 0.1, api_key: str = "", endpoint: str = ""):
            self.level = level

        def _score(self, texts, batch_size):
            return {"toxicity": [self.level] * len(texts)}

    register_scorer("door-const", Const, overwrite=True)
    cfg = GenConfig(max_new_tokens=2)
    sc = get_scorer("door-const", level=0.1, api_key=KEY, endpoint=f"https://u:{KEY}@h.example/x?key={KEY}")
    generate_run(llama, PROMPTS, tmp_path / "r", cfg, scorer=sc, progress=False)
    config = (tmp_path / "r" / "config.json").read_text()
    assert KEY not in config and json.loads(config)["scorer_options"] == {
        "endpoint": "https://***@h.example/x?key=***", "level": 0.1}
    with pytest.raises(RunError, match=r"differs in: scorer_options"):
        generate_run(llama, PROMPTS, tmp_path / "r", cfg, scorer=get_scorer("door-const", level=0.2, api_key=KEY),
                     progress=False)
    # the Perspective endpoint is part of the identity however the scorer is built, the key never
    from steerlab.scoring.perspective import PerspectiveScorer

    a = scorer_identity(PerspectiveScorer(api_key=KEY, endpoint="http://127.0.0.1:9/a"))
    b = scorer_identity(get_scorer("perspective", api_key=KEY, endpoint="http://127.0.0.1:9/b"))
    assert a != b and KEY not in json.dumps([a, b]) and a["scorer_options"]["endpoint"] == "http://127.0.0.1:9/a"
    assert scorer_identity(get_scorer("profanity")) == {"scorer": "profanity"}  # runs made before still resume


def test_sweep_identity_holds_the_vector_and_strengths_are_finite(tmp_path, llama):
    """Two vectors fitted on the same data (so the same data fingerprint) are different runs; a NaN
    strength is refused before the directory exists."""
    from steerlab.runs import RunError
    from steerlab.scoring import get_scorer
    from steerlab.steer import SteeringVector
    from steerlab.steer.sweep import sweep

    meta = {"data_fingerprint": "same"}
    a = SteeringVector({SITE: torch.ones(32)}, dict(meta))
    b = SteeringVector({SITE: -torch.ones(32)}, dict(meta))
    cfg, sc = GenConfig(max_new_tokens=2), get_scorer("profanity")
    with pytest.raises(V.ValidationError, match="sweep strength 1 must be a finite number"):
        sweep(llama, a, PROMPTS[:2], [1.0, float("nan")], sc, tmp_path / "s", cfg, fluency=False, progress=False)
    assert not (tmp_path / "s").exists()
    sweep(llama, a, PROMPTS[:2], [1.0], sc, tmp_path / "s", cfg, fluency=False, progress=False)
    with pytest.raises(RunError, match=r"differs in: vector\b"):
        sweep(llama, b, PROMPTS[:2], [1.0], sc, tmp_path / "s", cfg, fluency=False, progress=False)


# --- tracebacks: devices, environment, undecodable text, huge allocations, API misuse ------------------
def test_unavailable_devices_and_a_cache_that_is_a_file(tmp_path, monkeypatch):
    """``--device cuda:7`` / ``banana`` on a machine without them, ``STEERLAB_CACHE`` naming a file
    (before: RuntimeError / AssertionError / NotADirectoryError tracebacks, after the model was read)."""
    from steerlab.models.loading import cache_dir

    have = V.available_devices()
    assert have[0] == "cpu" and V.device("cpu") == "cpu" and V.device(None) is None
    with pytest.raises(V.ValidationError, match=rf"unknown device 'banana'; devices here: {re.escape(', '.join(have))}"):
        sl.load("default", device="banana")
    if "cuda:7" not in have:
        with pytest.raises(V.ValidationError, match=r"device 'cuda:7' is not available on this machine; devices here: cpu"):
            sl.load("default", device="cuda:7")
    f = tmp_path / "cache-file"
    f.write_text("x")
    monkeypatch.setenv("STEERLAB_CACHE", str(f))
    with pytest.raises(V.ValidationError, match=r"STEERLAB_CACHE=.*cache-file names a file, not a directory"):
        cache_dir()
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_undecodable_text_and_huge_generation_are_refused(llama):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 argument read as UTF-8
    with pytest.raises(V.ValidationError, match=r"text 1 is not valid UTF-8 \(undecodable bytes b'\\xe9' at "
                                                r"character 3\)"):
        llama.encode(["fine", bad])
    with pytest.raises(V.ValidationError, match=r"generating 1000000000 rows .* would need about [\d,.]+ GB of memory, "
                                                r"more than the .* available; lower -k"):
        generate(llama, PROMPTS[:2], GenConfig(max_new_tokens=4, sampling="t1.0", k=10**9))


def test_python_api_misuse_is_a_clear_error(llama):
    """Indexing a recording before any forward, ``vector + tensor``, ``vector * 'x'``, an unknown
    fit keyword (before: KeyError / AttributeError / TypeError tracebacks from deep inside)."""
    from steerlab import interventions as I
    from steerlab.steer import SteeringVector, VectorError

    with sl.record(llama, [SITE]) as rec:
        with pytest.raises(KeyError, match="nothing recorded at 'blocks.1.resid_post' yet") as e:
            rec[SITE]
        assert isinstance(e.value, sl.SteerlabError)
        with pytest.raises(sl.SteerlabError, match=r"'final' was not recorded; this recording holds blocks\.1"):
            rec["final"]
        enc = llama.encode(PROMPTS[:1])
        with torch.no_grad():
            llama.forward(enc["input_ids"], enc["attention_mask"])
    assert rec[SITE].shape[0] == 1
    v = SteeringVector({SITE: torch.ones(32)})
    with pytest.raises(VectorError, match="cannot add a Tensor and a steering vector"):
        v + torch.ones(32)
    with pytest.raises(V.ValidationError, match="must be a number"):
        v * "x"
    assert torch.equal((v * torch.tensor(2.0)).directions[SITE], torch.full((32,), 2.0))
    with pytest.raises(V.ValidationError, match=r"fitting 'steering' has no option 'layer'; accepted: .*sites"):
        I.fit("steering", llama, (["good"], ["bad"]), layer=3)


# --- the command line ---------------------------------------------------------------------------------
def _cli(args):
    from typer.testing import CliRunner

    from steerlab.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, flat(r.output)


def test_cli_outputs_and_options_checked_at_the_door(tmp_path, monkeypatch):
    """``--out ""`` (before: a run written into the current directory), ``--scorer none
    --scorer-option a=b`` (before: accepted silently), ``steer study --n-test -1`` (before: the full
    study started), unusable --html / export paths (before: tracebacks after the work)."""
    from steerlab.steer import SteeringVector
    from tiny import model_dir

    monkeypatch.chdir(tmp_path)
    mdir = model_dir(tmp_path)
    texts = tmp_path / "p.txt"
    texts.write_text("hello there\nhow are you\n")
    base = ["generate", "--model", mdir, "--prompts", texts, "--max-new-tokens", 2]
    before = sorted(os.listdir(tmp_path))
    code, out = _cli([*base, "--out", "", "--scorer", "none"])
    assert code == 2 and "must be a directory path, got an empty string" in out
    code, out = _cli([*base, "--out", tmp_path / "g", "--scorer", "none", "--scorer-option", "a=b"])
    assert code == 2 and "--scorer-option has no effect with --scorer none" in out
    code, out = _cli(["steer", "study", "--out", tmp_path / "s", "--model", mdir, "--n-test", -1])
    assert code == 2 and "n_test (--n-test) must be an integer >= 1, got -1" in out
    assert sorted(os.listdir(tmp_path)) == before  # nothing was created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out = _cli(["attribute", "hi", "--model", mdir, "--html", blocker / "a.html"])
    assert code == 2 and "is a file, not a directory" in out and "Traceback" not in out
    vec = SteeringVector({"blocks.1.resid_post": torch.ones(32)}).save(tmp_path / "v.safetensors")
    code, out = _cli(["steer", "export-gguf", vec, blocker / "v.gguf"])
    assert code == 2 and "is a file, not a directory" in out
    code, out = _cli(["steer", "export-gguf", vec, tmp_path / "new" / "dir" / "v.gguf"])  # a missing parent is made
    assert code == 0 and (tmp_path / "new" / "dir" / "v.gguf").stat().st_size > 0
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, m, **k))
    (tmp_path / "ro").mkdir()
    code, out = _cli(["steer", "export-gguf", vec, tmp_path / "ro" / "v.gguf"])
    assert code == 2 and "ro is not writable (read-only or permission denied)" in out
    code, out = _cli([*base, "--out", tmp_path / "ro", "--scorer", "none"])
    assert code == 2 and "not writable" in out and not os.listdir(tmp_path / "ro")


def test_cli_undecodable_argument_and_bad_device_are_one_line(tmp_path):
    from tiny import model_dir

    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, out = _cli(["lens", bad, "--model", model_dir(tmp_path)])
    assert code == 2 and "the value of prompt ('caf?') is not valid UTF-8" in out
    code, out = _cli(["generate", "--out", tmp_path / "g", "--model", model_dir(tmp_path), "--device", "banana",
                      "--scorer", "none"])
    assert code == 2 and "unknown device 'banana'; devices here: cpu" in out and not (tmp_path / "g").exists()


def test_ill_typed_apply_option_is_refused_before_the_run_directory(tmp_path, llama):
    """EigenShift ``k=abc``, ``alpha=abc`` (before: a ValueError traceback after config.json existed);
    a TypeError from an option no declaration checks is one error naming the options."""
    from steerlab.steer.eigenshift import EigenShift

    g = torch.Generator().manual_seed(0)
    iv = EigenShift.fit(llama, (torch.randn(20, 32, generator=g), torch.randn(20, 32, generator=g)), k=4)
    for opts, why in (({"k": "abc"}, "k: 'abc' is not an int"), ({"alpha": "abc"}, "alpha: 'abc' is not a float")):
        with pytest.raises(sl.SteerlabError, match=why):
            generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=2), intervention=iv,
                         apply_options=opts, progress=False)
        assert not (tmp_path / "r").exists()

    class Fragile(type(iv)):
        def generate(self, model, texts, cfg, keys=None, **options):
            return [[f"{t}{options['suffix'] + 1}"] for t in texts]  # a str option used as a number

    bad = Fragile(iv.indices, iv.sigma, iv.delta, iv.alpha, dict(iv.meta))
    with pytest.raises(sl.SteerlabError, match=r"eigenshift intervention cannot be applied with suffix='x': "
                                               r"TypeError"):
        generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=2), intervention=bad,
                     apply_options={"suffix": "x"}, progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("call, message", [
    (lambda: V.number("nan", "x"), "x must be a finite number, got nan"),
    (lambda: V.number(2, "x", 0, 1), r"x must be in \[0, 1\], got 2"),
    (lambda: V.number(0, "ratio", 0, lo_open=True), "ratio must be > 0, got 0"),
    (lambda: V.number(True, "x"), "x must be a number, got bool True"),
    (lambda: V.integer(2.5, "k", 1), r"k must be an integer \(>= 1\), got float 2.5"),
    (lambda: V.integer(-1, "n_test", 1), "n_test must be an integer >= 1, got -1"),
    (lambda: V.choice("nope", "mode", ["add", "ablate"]), "mode must be one of add, ablate; got 'nope'"),
])
def test_validation_messages_name_the_option_and_the_range(call, message):
    with pytest.raises(V.ValidationError, match=message):
        call()
    assert V.number("1e-3", "x") == 0.001 and V.integer(3.0, "k", 1) == 3 and V.number(torch.tensor(2.0), "x") == 2.0


def test_the_cli_error_handler_redacts_whatever_reaches_it(capsys):
    """The last line of defence: an error from anywhere that carries a URL with user info or a key,
    or KEY=VALUE with a secret name, is printed masked (and rich markup in it is shown literally)."""
    import typer

    from steerlab.cli.app import fail

    with pytest.raises(typer.Exit):
        fail(sl.SteerlabError(f"could not fetch https://bob:{KEY}@hub.example/m?token={KEY} (api_key={KEY}) "
                              f"[bold]x[/bold] accepted keywords: a, b"))
    out = flat(capsys.readouterr().out)
    assert KEY not in out and "https://***@hub.example/m?token=***" in out and "api_key=***" in out
    assert "[bold]x[/bold] accepted keywords: a, b" in out


def test_a_run_too_large_for_memory_is_refused_before_its_directory(tmp_path, llama):
    """``--max-new-tokens 10**9`` (before: the run directory was created and the first batch failed
    allocating, or ran for hours)."""
    with pytest.raises(V.ValidationError, match=r"of \d+ \+ 1000000000 tokens at once would need about"):
        generate_run(llama, PROMPTS, tmp_path / "r", GenConfig(max_new_tokens=10**9), progress=False)
    assert not (tmp_path / "r").exists()


def test_heads_vocabulary_too_large_and_nan_selfie_strength(tmp_path, llama):
    """``heads --words 1000000000`` (before: a RuntimeError after trying to allocate 343 GB for the
    293,003-word similarity matrix); ``interpret --mode add --strength nan`` (before: exit 0, every
    interpretation the text 'nan')."""
    from steerlab.explain.heads import explain_heads
    from tiny import model_dir

    with pytest.raises(V.ValidationError, match=r"the word-similarity matrix of 300000 words would need about "
                                                r"1,080\.0 GB of memory, more than the .* available; lower --words"):
        explain_heads(llama, words=[f"w{i}" for i in range(300_000)])
    code, out = _cli(["interpret", "hi", "--model", model_dir(tmp_path), "--mode", "add", "--strength", "nan"])
    assert code == 2 and "the injection strength (--strength) must be a finite number, got nan" in out


def test_cli_number_lists_must_be_finite(tmp_path):
    from tiny import model_dir

    code, out = _cli(["steer", "study", "--out", tmp_path / "s", "--model", model_dir(tmp_path), "--alphas", "0.5,nan"])
    assert code == 2 and "'0.5,nan' holds nan; every number must be finite" in out and not (tmp_path / "s").exists()
