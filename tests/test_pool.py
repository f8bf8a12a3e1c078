"""The benchmark's pool of the model's own continuations: generated once with the states EigenShift
needs, the same states as collecting them directly, served to EigenShift and AurA, keyed by what it
was generated from, and reused (not generated again) when a killed benchmark is rerun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab import interventions as I
from steerlab.experiments import pool
from steerlab.experiments.pool import build_pool, pool_spec, pool_states
from steerlab.generation import GenConfig
from steerlab.runs import RunError
from steerlab.scoring import Scorer, register_scorer
from steerlab.steer.toxic_states import collect_states
from tiny import model_dir, tiny_model

TESTS = Path(__file__).parent


class Letters(Scorer):
    """Toxicity 0.5 per rare letter (x z q j k) in the text: a tiny random model writes both kinds."""

    name = "letters"
    attributes = ["toxicity"]

    def _score(self, texts, batch_size):
        return {"toxicity": np.array([min(1.0, 0.5 * sum(c in "xzqjkXZQJK" for c in t)) for t in texts])}


try:
    register_scorer("letters", Letters)
except Exception:  # already registered (the module imported twice)
    pass

PROMPTS = [f"{w} number {i} says" for i, w in enumerate(["the cat", "a dog", "my friend", "this", "you"] * 8)]


def _prompts_file(tmp_path) -> str:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return str(f)


def test_pool_states_equal_collect_states_and_the_pool_is_keyed(tmp_path):
    m = tiny_model("llama")
    prompts = PROMPTS[:12]
    cfg = GenConfig(max_new_tokens=6, sampling="t1.0", k=4, seed=3, batch_size=8)
    pool = build_pool(m, tmp_path / "pool", prompts, cfg, Letters(), progress=False)
    assert len(pool.rows) == 48 and pool.n_batches == 6
    assert sorted(p.name for p in (tmp_path / "pool" / "states").iterdir()) == [f"{j:05d}.safetensors" for j in range(6)]
    greedy = GenConfig(max_new_tokens=6, sampling="greedy", batch_size=8)  # every state passes the argmax filter
    for c, p in ((cfg, pool), (greedy, build_pool(m, tmp_path / "g", prompts, greedy, Letters(), progress=False))):
        direct = collect_states(m, prompts, c, scorer=Letters(), min_states=0, progress=False)
        pooled = pool_states(m, p, Letters(), min_states=0)
        assert direct.stats == pooled.stats and direct.stats["toxic_continuations"] > 0
        assert torch.equal(direct.nontoxic, pooled.nontoxic) and torch.equal(direct.toxic, pooled.toxic)
        assert direct.data_fingerprint == pooled.data_fingerprint
    assert len(pooled.nontoxic) == 12 - pooled.stats["toxic_continuations"] > 0
    # the rows are the scorer's view of the pooled ids: decoding the states file gives the continuation
    new, states, conts, scores = next(pool.batches())
    assert conts == m.tok.batch_decode(new, skip_special_tokens=True) and states.shape[:2] == new.shape
    assert scores == [float(x) for x in Letters().toxicity(conts)]
    # state j produced token j: the last recorded state's argmax is the greedy choice of the model
    # on the prompt + tokens before it (checked independently with a plain forward, greedy decoding)
    g = build_pool(m, tmp_path / "greedy", prompts[:2], GenConfig(max_new_tokens=4, sampling="greedy"), Letters(),
                   progress=False)
    new, states, _, _ = next(g.batches())
    before_end = (torch.cumsum((new == m.tok.eos_token_id) | (new == m.pad_id), 1) == 0) | (torch.arange(4) == 0)
    assert torch.equal(m.unembed_module(states).argmax(-1)[before_end], new[before_end])
    # a pool of other settings in the same place is an error naming what differs, never reused
    with pytest.raises(RunError, match="differs in: seed"):
        build_pool(m, tmp_path / "pool", prompts, GenConfig(max_new_tokens=6, sampling="t1.0", k=4, seed=4,
                                                             batch_size=8), Letters(), progress=False)
    with pytest.raises(RunError, match="model_fingerprint"):
        build_pool(tiny_model("llama", seed=1), tmp_path / "pool", prompts, cfg, Letters(), progress=False)
    # a lost states file is an error that says how to regenerate
    (tmp_path / "pool" / "states" / "00002.safetensors").unlink()
    again = build_pool(m, tmp_path / "pool", prompts, cfg, Letters(), progress=False)
    with pytest.raises(sl.SteerlabError, match="states of batch 2 .* are missing; remove"):
        list(again.batches())


def test_pool_spec_is_eigenshift_recipes_collection():
    train = [f"t{i}" for i in range(300)]
    scores = [i / 300 for i in range(300)]
    prompts, cfg = pool_spec(train, scores, "quick", 5)
    assert prompts == [f"t{i}" for i in range(299, 171, -1)] and (cfg.k, cfg.max_new_tokens, cfg.seed) == (8, 16, 5)
    prompts, cfg = pool_spec(train, scores, "standard", 0)
    assert len(prompts) == 300 and cfg.max_new_tokens == 20 and cfg.sampling == "t1.0"


def test_aura_learns_from_the_pool_and_falls_back_clearly(tmp_path):
    from steerlab.experiments.recipes import BenchData, recipe_for

    m = tiny_model("llama")
    cfg = GenConfig(max_new_tokens=6, sampling="t1.0", k=4, seed=0, batch_size=8)
    pool = build_pool(m, tmp_path / "pool", PROMPTS[:12], cfg, Letters(), progress=False)
    contrast = sl.data.contrast_from_scores(PROMPTS, list(np.linspace(0, 1, len(PROMPTS))), n=8)
    data = BenchData(PROMPTS, [0.0] * len(PROMPTS), contrast, [], Letters(), 0, pool)
    iv = recipe_for("aura").fit(I.get("aura"), m, data, "quick")
    non = [r["continuation"] for r in pool.rows if r["continuation"].strip() and r["toxicity"] < 0.5]
    tox = [r["continuation"] for r in pool.rows if r["continuation"].strip() and r["toxicity"] >= 0.5]
    assert len(non) >= 8 and len(tox) >= 8
    ref = I.get("aura").fit(m, (non, tox))
    assert all(torch.equal(iv.aurocs[s], ref.aurocs[s]) for s in ref.aurocs)
    assert iv.meta["bench_data"].startswith(f"the pool: {len(tox)} toxic and {len(non)} non-toxic")
    # a pool without toxic continuations: the contrast set, and the fit says so
    for r in pool.rows:
        r["toxicity"] = 0.0
    iv = recipe_for("aura").fit(I.get("aura"), m, data, "quick")
    assert "fallback: the pool has 0 toxic" in iv.meta["bench_data"]
    assert all(torch.equal(iv.aurocs[s], a) for s, a in I.get("aura").fit(m, contrast).aurocs.items())
    with pytest.raises(sl.SteerlabError, match="pool of the model's own continuations"):
        recipe_for("aura").fit(I.get("aura"), m, BenchData(PROMPTS, [], contrast, [], Letters()), "quick")


RUNNER = """
import os, signal, sys
sys.path[:0] = [{tests!r}]
import test_pool  # registers the 'letters' scorer
from steerlab.steer import toxic_states
kill_at, calls, plain = {kill_at}, [0], toxic_states.generate_with_states
def counted(*a, **k):
    calls[0] += 1
    if calls[0] == kill_at:  # before this batch: the earlier ones are written
        os.kill(os.getpid(), signal.SIGKILL)
    return plain(*a, **k)
toxic_states.generate_with_states = counted
from steerlab.experiments import pool
built = pool.build_pool
def then_kill(*a, **k):
    out = built(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
pool.build_pool = then_kill
from steerlab.cli import app
app({args!r}, prog_name="steerlab")
"""


def _bench_args(model: str, prompts: str, out) -> list[str]:
    return ["bench", "--model", model, "--out", str(out), "--methods", "eigenshift,aura", "--scorer", "letters",
            "--prompts", prompts, "--n-val", "3", "--n-test", "5", "--k", "2", "--max-new-tokens", "3"]


def _killed(tmp_path, args, kill_at: int) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", RUNNER.format(tests=str(TESTS), kill_at=kill_at, args=args)],
                       env=env, capture_output=True, text=True, timeout=600)
    return p.returncode


def test_a_killed_benchmark_reuses_its_pool(tmp_path, monkeypatch):
    from steerlab.experiments.bench import make_config, run_bench
    from steerlab.steer import toxic_states

    d, prompts = model_dir(tmp_path), _prompts_file(tmp_path)
    out = tmp_path / "bench"
    # killed (SIGKILL) after two of the pool's batches, then killed again right after the pool is written
    assert _killed(tmp_path, _bench_args(d, prompts, out), kill_at=3) == -signal.SIGKILL
    rows = [json.loads(x) for x in (out / "pool" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * pool.POOL_BATCH and not (out / "fit").exists()
    assert _killed(tmp_path, _bench_args(d, prompts, out), kill_at=0) == -signal.SIGKILL
    n_batches = len(list((out / "pool" / "states").iterdir()))
    assert len((out / "pool" / "results.jsonl").read_text().splitlines()) == 8 * 24 and n_batches == -(-8 * 24 // pool.POOL_BATCH)
    assert not (out / "metrics.json").exists()
    # the rerun: nothing of the pool is generated again, and it reaches an uninterrupted run's numbers
    plain, calls = toxic_states.generate_with_states, []
    monkeypatch.setattr(toxic_states, "generate_with_states", lambda *a, **k: calls.append(1) or plain(*a, **k))
    m = sl.load(d)
    cfg = make_config("quick", methods=["eigenshift", "aura"], scorer="letters", prompts=prompts, n_val=3, n_test=5,
                      k=2, max_new_tokens=3)
    resumed = run_bench(m, out, cfg, progress=False)
    assert calls == []
    fresh = run_bench(m, tmp_path / "fresh", cfg, progress=False)
    assert len(calls) == n_batches  # the uninterrupted run generates its pool once
    for a, b in zip(resumed["arms"], fresh["arms"]):
        for key in ("status", "reason", "toxicity", "paired_difference", "settings", "describe"):
            assert a.get(key) == b.get(key), (a["method"], key)
    aura = {a["method"]: a for a in resumed["arms"]}["aura"]
    assert aura["status"] == "ok" and "fitted on the pool: " in aura["describe"]
    assert I.load(out / "fit" / "aura.safetensors", m).fingerprint() == \
        I.load(tmp_path / "fresh" / "fit" / "aura.safetensors", m).fingerprint()
    # the random tiny model's toxic continuations hold no toxic word: EigenShift says so
    es = {a["method"]: a for a in resumed["arms"]}["eigenshift"]
    assert es["status"] == "failed" and "0 toxic" in es["reason"]
    assert "pool: generate" in {r["stage"] for r in fresh["profile"]}
    assert json.loads((out / "pool" / "record.json").read_text())["n_rows"] == 8 * 24


@pytest.mark.integration
def test_pooled_states_equal_collected_states_on_the_real_model(real_model, tmp_path):
    """Toxic-word positions (BiLSTM saliency), the argmax filter and matched positions give the same
    states from the pool as from collect_states generating the same prompts."""
    from steerlab.data import load_prompts, split

    train = split(load_prompts("rtp"), seed=0)["train"]
    scores = sl.scoring.get_scorer("default").toxicity([p.text for p in train])
    prompts = [train[i].text for i in np.argsort(-scores)[:6]]
    cfg = GenConfig(max_new_tokens=8, sampling="t1.0", k=4, seed=0, batch_size=8)
    pool = build_pool(real_model, tmp_path / "pool", prompts, cfg, sl.scoring.get_scorer("default"), progress=False)
    for positions in ("first", "matched"):
        direct = collect_states(real_model, prompts, cfg, min_states=1, progress=False, positions=positions)
        pooled = pool_states(real_model, pool, "default", positions=positions, min_states=1)
        assert direct.stats == pooled.stats and direct.stats["toxic_word_found"] > 0, direct.stats
        assert torch.equal(direct.toxic, pooled.toxic) and torch.equal(direct.nontoxic, pooled.nontoxic)
