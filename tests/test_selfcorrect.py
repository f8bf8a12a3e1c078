"""Intrinsic self-correction study (arXiv 2505.11924): protocol, pure analysis functions, pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from steerlab.errors import EmptyInputError, ShapeError
from steerlab.experiments.selfcorrect import (
    SelfCorrectConfig,
    SelfCorrectError,
    make_config,
    run_selfcorrect,
)
from steerlab.explain.shifts import (
    bootstrap_shift_stats,
    lexicon_relation,
    logit_shift,
    max_stat_pvalues,
    moved_as_instructed,
    per_sample_cos,
    projection_stats,
    shuffled_directions,
    svd_shares,
)
from steerlab.protocols.selfcorrect import (
    InstructionError,
    dialogue,
    get_instruction,
    instruction_kinds,
    load_instructions,
    parse_completion,
    register_instruction,
    reset_instructions,
)
from tiny import first_real_tokens, tiny_model

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(autouse=True)
def _fresh_registry():
    reset_instructions()
    yield
    reset_instructions()


@pytest.fixture
def chat_llama():
    m = tiny_model("llama")
    m.tok.chat_template = TEMPLATE
    return m


# --- instructions and dialogues ------------------------------------------------------------------
def test_builtin_kinds_and_unknown_kind():
    assert {"opening", "strong_detox", "weak_detox", "strong_toxify", "weak_toxify"} <= set(instruction_kinds())
    assert instruction_kinds("detox") == ["strong_detox", "weak_detox"]
    assert "{prompt}" in get_instruction("opening").text
    with pytest.raises(InstructionError, match="unknown instruction kind 'medium_detox'.*strong_detox"):
        get_instruction("medium_detox")
    with pytest.raises(InstructionError, match="unknown instruction kind"):
        make_config(detox="nope").validate()


def test_register_and_load_instructions(tmp_path):
    register_instruction("polite_detox", "Please be polite.")
    assert get_instruction("polite_detox").direction == "detox"
    with pytest.raises(InstructionError, match="already registered"):
        register_instruction("polite_detox", "Other text.")
    with pytest.raises(InstructionError, match="direction"):
        register_instruction("mystery", "Hm.")
    with pytest.raises(InstructionError, match=r"\{prompt\}"):
        register_instruction("my_opening", "no placeholder")
    f = tmp_path / "inst.json"
    f.write_text(json.dumps({"strong_detox": "Replaced.", "shout": {"text": "LOUDER", "direction": "toxify"}}))
    assert load_instructions(f) == ["strong_detox", "shout"]
    assert get_instruction("strong_detox").text == "Replaced."
    assert get_instruction("shout").direction == "toxify"
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InstructionError, match="JSON object"):
        load_instructions(tmp_path / "bad.json")
    with pytest.raises(SelfCorrectError, match="used as the detox one"):
        make_config(detox="shout").validate()


def test_dialogue_structure():
    d1 = dialogue("You are a", [], "weak_detox")
    assert len(d1) == 1 and d1[0]["role"] == "user" and "You are a" in d1[0]["content"]
    d3 = dialogue("You are a", ["reply one", "reply two"], "weak_detox")
    assert [m["role"] for m in d3] == ["user", "assistant", "user", "assistant", "user"]
    assert d3[1]["content"] == "reply one" and d3[4]["content"] == get_instruction("weak_detox").text
    with pytest.raises(InstructionError, match="not a correction"):
        dialogue("x", ["r"], "opening")


def test_parse_completion():
    assert parse_completion('Sure.\nCompletion: "The cat sat on the mat."') == ("The cat sat on the mat.", True)
    assert parse_completion("completion:  A.\n\nExplanation: blah") == ("A.", True)
    # the last marker with text after it wins; a trailing empty marker is skipped
    assert parse_completion("Give it after Completion:. Completion: B. Completion:") == ("B.", True)
    assert parse_completion("  no marker here ") == ("no marker here", False)


# --- pure analysis functions ---------------------------------------------------------------------
def test_moved_as_instructed_hand_example():
    tox = np.array([
        [0.9, 0.5, 0.3, 0.2, 0.1],    # detox: 4 of 4 moves down
        [0.9, 0.5, 0.6, 0.3, 0.2],    # detox: 3 of 4
        [0.9, 0.5, 0.6, 0.7, 0.2],    # detox: 2 of 4 -> not kept
        [0.5, 0.5, 0.495, 0.3, 0.1],  # detox: 0.5 -> 0.495 is below the 2% threshold: 2 of 4
        [0.1, 0.3, 0.5, 0.4, 0.9],    # toxify: 3 of 4 up
    ])
    sign = np.array([-1, -1, -1, -1, 1])
    assert moved_as_instructed(tox, sign).tolist() == [True, True, False, False, True]
    # R = 3: ceil(0.75 * 2) = 2 transitions needed
    assert moved_as_instructed(np.array([[0.9, 0.5, 0.6], [0.9, 0.5, 0.4]]), -1).tolist() == [False, True]
    # R = 2: one transition
    assert moved_as_instructed(np.array([[0.2, 0.1]]), -1).tolist() == [True]
    with pytest.raises(ShapeError):
        moved_as_instructed(np.array([0.1, 0.2]), 1)


def test_logit_shift_and_lexicon_relation_hand_computation():
    # 2 samples, 1 transition, d = 2, vocab of 5
    D = np.array([[[1.0, 0.0]], [[3.0, 2.0]]])       # mean difference = [2, 1]
    U = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 2.0]])
    s = logit_shift(D, torch.tensor(U, dtype=torch.float32))
    assert np.allclose(s, [[2.0, 1.0, 3.0, 1.0, 0.0]])
    ids = np.array([0, 1, 2, 3, 4])
    tox = np.array([0.9, 0.1, 0.5, 0.8, 0.05])
    rows = lexicon_relation(s, ids, tox, k=2)
    (r,) = rows
    # most toxic: tokens 0 (0.9) and 3 (0.8): 2*0.9 + 1*0.8 = 2.6; least toxic: 4 (0.05), 1 (0.1): 0*0.05 + 1*0.1
    assert r["k"] == 2 and r["transition"] == "1->2"
    assert math.isclose(r["toxic_weighted"], 2.6) and math.isclose(r["nontoxic_weighted"], 0.1)
    assert math.isclose(r["toxic_mean_logit"], 1.5) and math.isclose(r["nontoxic_mean_logit"], 0.5)
    assert math.isclose(r["gap"], 1.0) and math.isclose(r["vocab_mean_logit"], 7 / 5)
    assert math.isclose(r["toxic_vs_vocab"], 1.5 - 1.4) and math.isclose(r["nontoxic_vs_vocab"], 0.5 - 1.4)
    # k larger than half the lexicon is cut
    assert lexicon_relation(s, ids, tox, k=100)[0]["k"] == 2
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        lexicon_relation(s, np.array([0, 9]), np.array([0.1, 0.2]))


def test_projection_stats_hand_computation():
    st = projection_stats(np.array([3.0, 4.0]), np.array([2.0, 0.0]))
    # lambda = <P,s>/<s,s> = 6/4; rejection = P - 1.5 s = [0, 4]; cos = 3/5
    assert math.isclose(st["lambda"], 1.5) and math.isclose(st["rejection_norm"], 4.0)
    assert math.isclose(st["cos"], 0.6) and math.isclose(st["shift_norm"], 5.0)
    with pytest.raises(ShapeError):
        projection_stats(np.ones(2), np.zeros(2))


def test_svd_shares():
    M = np.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
    sh = svd_shares(M)
    assert math.isclose(sh["rank1_share"], 1.0) and math.isclose(sh["rank2_share"], 1.0)
    assert math.isclose(sh["v1_mean_cos"], 1.0)


def test_config_presets():
    c = make_config("small", n=10)
    assert (c.n, c.rounds, c.max_new_tokens) == (10, 3, 40)
    assert SelfCorrectConfig().rounds == 5 and SelfCorrectConfig().max_new_tokens == 150
    with pytest.raises(SelfCorrectError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(SelfCorrectError, match="rounds must be >= 2"):
        make_config(rounds=1).validate()


# --- the pipeline on a tiny model ----------------------------------------------------------------
PROMPTS = ["you stupid idiot", "shut up you moron", "a nice day", "the cat sat"]
# the rest of the pool: the steering pairs come from prompts outside the study
OUTSIDE = ["what a stupid moron", "you idiot loser", "shut up idiot you fool", "the sky is blue", "we had lunch",
           "a quiet morning"]


def _short_instructions():
    register_instruction("t_opening", "Complete: {prompt}")
    register_instruction("t_detox", "Be nicer.")
    register_instruction("t_toxify", "Be ruder.")
    return {"opening": "t_opening", "detox": "t_detox", "toxify": "t_toxify"}


def test_pipeline_tiny_end_to_end(chat_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    kinds = _short_instructions()
    out = tmp_path / "run"
    kw = dict(prompts=PROMPTS + OUTSIDE, n=4, rounds=2, max_new_tokens=5, selection="rank", lexicon_min_len=1,
              steer_pairs=2, n_controls=2, n_null=5, n_boot=50, progress=False, **kinds)
    res = run_selfcorrect(chat_llama, out, **kw)
    for f in ["config.json", "record.json", "results.jsonl", "metrics.json", "report.html",
              "steering_vector.safetensors", "states/round_1.npz", "states/round_2.npz",
              "tables/toxicity_per_round.csv", "tables/lexicon_relation.csv", "tables/steering_cosine.csv",
              "tables/svd.csv", "tables/pca_coords.csv", "tables/samples.csv",
              "figures/toxicity_per_round.png", "figures/pca_arrows.png", "figures/steering_cosine.png",
              "figures/lexicon_relation.png"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["round"] for r in rows} == {1, 2}
    assert {r["group"] for r in rows} == {"detox", "toxify"}
    # rank selection: the two most toxic prompts of the pool are the detox group, the two least the toxify group
    from steerlab.scoring import get_scorer

    pool = PROMPTS + OUTSIDE
    ranked = [pool[i] for i in np.argsort(get_scorer("default").toxicity(pool))]
    assert {r["prompt"] for r in rows if r["group"] == "detox"} == set(ranked[-2:])
    assert {r["prompt"] for r in rows if r["group"] == "toxify"} == set(ranked[:2])
    assert res.headline["steering"]["from"] == "prompts outside the study"
    z = np.load(out / "states" / "round_2.npz")
    assert z["prompt"].shape == (4, 32) and z["response"].shape == (4, 32) and z["resid"].shape == (4, 3, 32)
    assert len(res.cosine) == 3 * 3 * 1 * 3  # states x (2 groups + their contrast) x transitions x layers
    lam = {(r["group"], r["layer"]): r["lambda"] for r in res.cosine if r["state"] == "prompt"}
    for layer in range(3):  # lambda is linear in the shift: contrast = detox - toxify
        assert math.isclose(lam[("detox-toxify", layer)], lam[("detox", layer)] - lam[("toxify", layer)],
                            rel_tol=1e-6, abs_tol=1e-9)
    assert {r["state"] for r in res.lexicon} == {"prompt", "response"}
    h = json.loads((out / "metrics.json").read_text())
    assert len(h["detox"]["toxicity_mean"]) == 2 and len(h["toxify"]["first_shift_cos_by_layer"]) == 3
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Toxicity per round" in html

    # the logged states equal a fresh capture of the round-2 dialogue
    from steerlab.hooks import capture
    from steerlab.protocols.selfcorrect import dialogue as dlg

    r1 = {r["sample"]: r for r in rows if r["round"] == 1}
    d = dlg(r1[0]["prompt"], [r1[0]["response"]], r1[0]["instruction"], "t_opening")
    h_last = capture(chat_llama, [d], ["final"], "last", chat=True)["final"][0]
    assert torch.allclose(torch.from_numpy(z["prompt"][0]), h_last, atol=1e-5)

    # rerunning the same call resumes: nothing is regenerated, same numbers
    res2 = run_selfcorrect(chat_llama, out, **kw)
    assert len((out / "results.jsonl").read_text().splitlines()) == 8
    assert res2.headline["rounds_generated_this_call"] == [] and set(res2.headline["round_seconds"]) == {"1", "2"}
    assert json.dumps(res2.toxicity) == json.dumps(res.toxicity)  # NaN-aware: an empty subset has NaN means


def test_generate_round_states_match_a_fresh_forward(chat_llama):
    """States recorded during generation equal a forward over prompt + reply, including a reply cut
    short by the end token (greedy decoding, so the reference generate call gives the same tokens)."""
    from steerlab.experiments.selfcorrect import generate_round
    from steerlab.hooks import capture

    kinds = _short_instructions()
    m = chat_llama
    dials = [dialogue(p, [], kinds["detox"], kinds["opening"]) for p in ["ab", "a longer prompt", "xyz"]]
    cfg = make_config(max_new_tokens=6, sampling="greedy", batch_size=4, **kinds)
    enc = m.encode(dials, chat=True)
    ref = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=6,
                        do_sample=False, pad_token_id=m.tok.pad_token_id)
    gen = ref[:, enc["input_ids"].shape[1]:]
    m.hf.generation_config.eos_token_id = int(gen[0, 2])  # row 0 now stops at its third token
    texts, st = generate_round(m, dials, ["k0", "k1", "k2"], cfg, round_index=1)
    stop = {int(gen[0, 2]), m.tok.eos_token_id}
    for i, d in enumerate(dials):
        g = gen[i].tolist()
        n = next((j for j, t in enumerate(g) if t in stop), len(g))
        assert st["response_tokens"][i] == max(n, 1)
        p_ids = m.tok(m.chat_text(d), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + g[:max(n, 1) - 1]])
        h = capture(m, {"input_ids": ids}, ["final", "blocks.1.resid_post"], "all")
        want = h["final"][0, len(p_ids) - 1:].mean(0)
        assert torch.allclose(torch.from_numpy(st["response"][i]), want, atol=1e-4)
        assert torch.allclose(torch.from_numpy(st["prompt"][i]), h["final"][0, len(p_ids) - 1], atol=1e-4)
        assert torch.allclose(torch.from_numpy(st["resid"][i, 1]), h["blocks.1.resid_post"][0, len(p_ids) - 1], atol=1e-4)
    assert st["response_tokens"][0] == 2


def test_pipeline_errors(chat_llama, tmp_path):
    kinds = _short_instructions()
    with pytest.raises(EmptyInputError, match="empty prompt set"):
        run_selfcorrect(chat_llama, tmp_path / "a", prompts=[], n=2, rounds=2, progress=False, **kinds)
    with pytest.raises(SelfCorrectError, match="no chat template"):
        run_selfcorrect(tiny_model("llama"), tmp_path / "b", prompts=PROMPTS, n=2, rounds=2, progress=False, **kinds)
    from steerlab.errors import DataError

    with pytest.raises(SelfCorrectError, match="outside the study"):
        # every prompt of the pool is in the study: no disjoint steering pairs
        run_selfcorrect(chat_llama, tmp_path / "d", prompts=PROMPTS, n=4, rounds=2, selection="rank",
                        progress=False, **kinds)
    assert not (tmp_path / "d").exists()  # refused before anything is written
    with pytest.raises(DataError, match="selection='rank'"):
        # the tiny prompts have at most two toxic ones: 4 detox samples cannot be drawn
        run_selfcorrect(chat_llama, tmp_path / "c", prompts=PROMPTS, n=4, directions="detox", rounds=2,
                        progress=False, **kinds)


def test_cli_list_instructions():
    from typer.testing import CliRunner

    from steerlab.cli import app

    r = CliRunner().invoke(app, ["selfcorrect", "--list-instructions"])
    assert r.exit_code == 0, r.output
    assert "strong_detox" in r.output and "weak_toxify" in r.output


@pytest.mark.integration
def test_selfcorrect_real_model(real_model, tmp_path):
    """A few dialogues on SmolLM2-135M-Instruct: replies are parsed and scored, shifts are non-zero."""
    res = run_selfcorrect(real_model, tmp_path / "run", n=4, rounds=2, max_new_tokens=8, steer_pairs=4,
                          n_controls=2, batch_size=4, progress=False)
    h = res.headline
    assert h["detox"]["n"] == 2 and h["toxify"]["n"] == 2
    assert all(0 <= v <= 1 for v in h["detox"]["toxicity_mean"])
    assert len(h["detox"]["first_shift_cos_by_layer"]) == real_model.n_layers
    assert h["detox"]["shift_norm_by_transition"]["1->2"] > 0
    assert (tmp_path / "run" / "report.html").is_file()


# --- statistics of the steering comparison (hand and plain-numpy references) ------------------------
def test_per_sample_cos_hand():
    D = np.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 2.0]]])  # [n=2, L=2, d=2]
    V = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = per_sample_cos(D, V)
    assert np.allclose(c, [[1.0, 0.0], [1 / math.sqrt(2), 1.0]])  # a zero shift counts 0
    with pytest.raises(ShapeError):
        per_sample_cos(D, V[:1])


def test_bootstrap_shift_stats_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    D = rng.normal(size=(7, 2, 4)) + np.array([1.0, 0, 0, 0])
    V = rng.normal(size=(2, 4))
    got = bootstrap_shift_stats(D, V, n_boot=200, seed=5, chunk=200)
    draws = np.random.default_rng(5).integers(0, 7, size=(200, 7))  # the same draws, one chunk

    def stats(X):
        m = X.mean(0)
        cos = [(m[layer] @ V[layer]) / np.linalg.norm(m[layer]) / np.linalg.norm(V[layer]) for layer in range(2)]
        msc = [np.mean([X[i, layer] @ V[layer] / np.linalg.norm(X[i, layer]) / np.linalg.norm(V[layer])
                        for i in range(len(X))]) for layer in range(2)]
        lam = [(m[layer] @ V[layer]) / (V[layer] @ V[layer]) for layer in range(2)]
        return np.array([cos, msc, lam])

    point = stats(D)
    boot = np.stack([stats(D[idx]) for idx in draws])  # [200, 3, L]
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    for j, k in enumerate(("cos", "mean_sample_cos", "lambda")):
        assert np.allclose(got[k], point[j]) and np.allclose(got[f"{k}_lo"], lo[j]) and np.allclose(got[f"{k}_hi"], hi[j])
        assert (got[f"{k}_lo"] <= got[k] + 1e-12).all() and (got[k] <= got[f"{k}_hi"] + 1e-12).all()
    # chunking does not change the draws
    assert np.allclose(bootstrap_shift_stats(D, V, n_boot=200, seed=5, chunk=7)["cos_lo"], got["cos_lo"])


def test_shuffled_directions_are_mean_differences_of_permuted_labels():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 2, 3))
    A[:3] += 5.0  # desirable rows far from the undesirable ones
    null = shuffled_directions(A, 3, n_null=4, seed=11)
    ref = np.random.default_rng(11)
    for j in range(4):
        p = ref.permutation(6)
        diff = A[p[:3]].mean(0) - A[p[3:]].mean(0)
        assert np.allclose(null[j], diff / np.linalg.norm(diff, axis=-1, keepdims=True))
    assert np.allclose(np.linalg.norm(null, axis=-1), 1.0)
    with pytest.raises(ShapeError):
        shuffled_directions(A, 0, 2)


def test_max_stat_pvalues_hand():
    obs = np.array([0.1, -0.5, 0.2])
    null = np.array([[0.2, 0.1, 0.0], [0.05, 0.6, 0.1], [0.0, 0.1, 0.3], [0.4, 0.0, 0.0]])
    r = max_stat_pvalues(obs, null)
    # per layer: #{|null| >= |obs|} = 2, 1, 1 -> (1 + c) / 5
    assert np.allclose(r["p_layer"], [3 / 5, 2 / 5, 2 / 5])
    # the best layer is 1 (|-0.5|); null maxima 0.2, 0.6, 0.3, 0.4: one >= 0.5 -> (1 + 1) / 5
    assert r["best_layer"] == 1 and math.isclose(r["p_max"], 2 / 5) and math.isclose(r["best_abs"], 0.5)
    # the corrected p-value is never below the uncorrected one of the picked layer
    assert r["p_max"] >= r["p_layer"][1]


def test_neutral_instruction_is_registered():
    assert instruction_kinds("neutral") == ["neutral_rewrite"]
    assert get_instruction("neutral_rewrite").text.startswith("Rewrite your last completion.")
    assert make_config("crossed").arm_kinds() == ("strong_detox", "strong_toxify", "neutral_rewrite")
    assert "weak_detox" in make_config("robustness").arm_kinds()
    with pytest.raises(SelfCorrectError, match="at least two"):
        make_config(arms="strong_detox").validate()
    with pytest.raises(SelfCorrectError, match="opening"):
        make_config(arms="strong_detox,opening").validate()


def test_pipeline_paper_statistic_and_steering_pairs_outside_the_study(chat_llama, tmp_path, monkeypatch):
    """The steering pairs come from the pool's prompts outside the study (no fallback), the vector is
    the hand mean difference of those prompts, and the paper's statistic and lambda in the tables equal
    a numpy computation from the saved states."""
    from steerlab.hooks import capture
    from steerlab.steer.vector import SteeringVector

    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    kinds = _short_instructions()
    out = tmp_path / "run"
    res = run_selfcorrect(chat_llama, out, prompts=PROMPTS + OUTSIDE, n=4, rounds=2, max_new_tokens=5,
                          selection="rank", lexicon_min_len=1, steer_pairs=3, n_controls=2, n_null=9, n_boot=50,
                          progress=False, **kinds)
    st = res.headline["steering"]
    assert st["from"] == "prompts outside the study" and st["pairs"] == 3
    from steerlab.scoring import get_scorer

    study = {s["prompt"] for s in res.samples}
    outside = [t for t in PROMPTS + OUTSIDE if t not in study]
    assert len(study) == 4 and len(outside) == 6
    scores = get_scorer("default").toxicity(outside)
    order = np.argsort(scores)  # 3 least toxic (desirable), then the 3 most toxic
    assert scores[order[2]] < 0.5 < scores[order[3]]
    sv = SteeringVector.load(out / "steering_vector.safetensors")
    cap = capture(chat_llama, [outside[i] for i in order], [f"blocks.{i}.resid_post" for i in range(3)], "all")
    kept = (cap.mask.bool() & ~first_real_tokens(cap.mask)).float()[..., None]  # the default: first tokens out
    for i in range(3):
        a = (cap[f"blocks.{i}.resid_post"] * kept).sum(1) / kept.sum(1)
        want = a[:3].mean(0) - a[3:].mean(0)  # non-toxic minus toxic, outside the study only
        assert torch.allclose(sv.directions[f"blocks.{i}.resid_post"], want / want.norm(), atol=1e-5)

    z1, z2 = np.load(out / "states" / "round_1.npz"), np.load(out / "states" / "round_2.npz")
    assert z2["resid_response"].shape == (4, 3, 32)
    det = [s["sample"] for s in res.samples if s["group"] == "detox"]
    V = np.stack([sv.directions[f"blocks.{i}.resid_post"].numpy() for i in range(3)]).astype(np.float64)
    Df = (z2["response"] - z1["response"])[det].astype(np.float64)          # final-norm response mean shift
    Dr = (z2["resid_response"] - z1["resid_response"])[det].astype(np.float64)
    rows = {(r["group"], r["state"], r["layer"]): r for r in res.cosine}
    for layer in range(3):
        v = V[layer]
        paper = np.mean([d @ v / np.linalg.norm(d) / np.linalg.norm(v) for d in Df])
        own = np.mean([d[layer] @ v / np.linalg.norm(d[layer]) / np.linalg.norm(v) for d in Dr])
        r = rows[("detox", "final_response", layer)]
        assert math.isclose(r["mean_sample_cos"], paper, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(rows[("detox", "response", layer)]["mean_sample_cos"], own, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(r["lambda"], Df.mean(0) @ v / (v @ v), rel_tol=1e-4, abs_tol=1e-6)
        assert r["msc_lo"] <= r["mean_sample_cos"] + 1e-9 <= r["msc_hi"] + 2e-9
        assert 1 / 10 <= r["p_msc"] <= 1 and 1 / 10 <= r["p_cos"] <= 1
    best = [b for b in res.best_layer if b["group"] == "detox" and b["state"] == "final_response"
            and b["statistic"] == "mean_sample_cos"]
    assert len(best) == 1 and best[0]["n_null"] == 9
    assert best[0]["p_max_over_layers"] >= best[0]["p_layer_uncorrected"]
    for f in ["tables/steering_best_layer.csv", "tables/vector_lexicon.csv", "figures/pca_3d.png",
              "figures/steering_paper_stat.png", "figures/vector_lexicon.png"]:
        assert (out / f).is_file(), f


def test_vector_lexicon_hand(chat_llama):
    from steerlab.experiments.selfcorrect_analysis import vector_lexicon
    from steerlab.steer.vector import SteeringVector

    g = torch.Generator().manual_seed(0)
    sv = SteeringVector({f"blocks.{i}.resid_post": torch.randn(32, generator=g) for i in range(3)})
    ids = np.array([1, 2, 3, 4, 5, 6])
    tox = np.array([0.9, 0.8, 0.1, 0.05, 0.7, 0.2])
    rows = vector_lexicon(chat_llama, sv, (ids, tox), k=2)
    U = chat_llama.W_U.detach().double().numpy()
    for i, r in enumerate(rows):
        logits = U @ sv.directions[f"blocks.{i}.resid_post"].double().numpy()
        assert r["layer"] == i
        assert math.isclose(r["toxic_vs_vocab"], logits[[1, 2]].mean() - logits.mean(), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(r["nontoxic_vs_vocab"], logits[[4, 3]].mean() - logits.mean(), rel_tol=1e-5, abs_tol=1e-6)


def test_crossed_design_same_prompts_every_arm(chat_llama, tmp_path, monkeypatch):
    """Every prompt gets every arm; round 1 is the same dialogue with the same random numbers in every arm;
    the paired arm differences equal the differences of the per-prompt toxicities."""
    monkeypatch.setenv("STEERLAB_CACHE", str(tmp_path / "cache"))
    kinds = _short_instructions()
    register_instruction("t_neutral", "Again.", direction="neutral")
    out = tmp_path / "run"
    res = run_selfcorrect(chat_llama, out, prompts=PROMPTS + OUTSIDE, n=4, rounds=2, max_new_tokens=5,
                          selection="rank", lexicon_min_len=1, steer_pairs=3, n_controls=2, n_null=5, n_boot=50,
                          arms="t_detox,t_toxify,t_neutral", progress=False, **kinds)
    assert res.headline["groups"] == ["t_detox", "t_toxify", "t_neutral"]
    assert res.headline["contrasts"] == ["t_detox-t_neutral", "t_toxify-t_neutral"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3 * 2
    by = {(r["instruction"], r["prompt_id"], r["round"]): r for r in rows}
    pids = {r["prompt_id"] for r in rows}
    assert len(pids) == 4
    for pid in pids:  # round 1 is shared: same text in every arm
        assert len({by[(a, pid, 1)]["response"] for a in ("t_detox", "t_toxify", "t_neutral")}) == 1
    diffs = {(d["arm"], d["minus"], d["prompts"], d["round"]): d for d in res.arm_differences}
    for (a, b) in (("t_detox", "t_neutral"), ("t_detox", "t_toxify")):
        for r in (1, 2):
            want = np.mean([by[(a, pid, r)]["toxicity"] - by[(b, pid, r)]["toxicity"] for pid in pids])
            d = diffs[(a, b, "all", r)]
            assert math.isclose(d["diff"], want, abs_tol=1e-9) and d["lo"] - 1e-9 <= d["diff"] <= d["hi"] + 1e-9
        assert diffs[(a, b, "all", 1)]["diff"] == 0.0
    assert {k[2] for k in diffs} == {"all", "toxic", "nontoxic"}
    # the contrast is per prompt: its per-sample shifts are the differences of the two arms' shifts
    c = [r for r in res.cosine if r["group"] == "t_detox-t_neutral" and r["state"] == "prompt"]
    assert len(c) == 3 and all(r["n"] == 4 for r in c)
    assert (out / "figures" / "arms_toxicity.png").is_file()
