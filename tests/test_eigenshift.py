"""EigenShift: the SVD / delta / dampening against independent numpy computations, the logit correction
(no weight touched, the hook removed also on errors), files, state collection, bad inputs."""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import steerlab as sl
from steerlab import interventions as I
from steerlab.generation import GenConfig
from steerlab.steer.eigenshift import (
    EigenShift,
    EigenShiftError,
    choose_k,
    dampen,
    edited_weight,
    projections,
    svd,
)
from steerlab.steer.toxic_states import (
    StateCollectionError,
    ToxicStates,
    collect_states,
    first_word_token,
    salient_words,
)
from tiny import model_dir, tiny_model


def _states(d, n=24, seed=0, shift=None):
    g = torch.Generator().manual_seed(seed)
    tox, non = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    if shift is not None:
        tox = tox + shift
    return tox, non


def test_dampened_reconstruction_equals_independent_svd():
    rng = np.random.default_rng(0)
    U = rng.normal(size=(40, 8))
    tox, non = _states(8, shift=torch.from_numpy(rng.normal(size=8) * 2))
    dec = svd(torch.from_numpy(U))
    damp = dampen(dec, tox, non, k=3, alpha=0.2)
    # independent: numpy SVD, the same sign convention, delta from explicit dot products b_i . h
    A, s, Vt = np.linalg.svd(U, full_matrices=False)
    sign = np.sign(Vt[np.arange(8), np.abs(Vt).argmax(1)])
    A, Vt = A * sign, Vt * sign[:, None]
    delta = np.array([np.mean([Vt[i] @ h for h in tox.numpy()]) - np.mean([Vt[i] @ h for h in non.numpy()])
                      for i in range(8)])
    np.testing.assert_allclose(damp.delta.numpy(), delta, atol=1e-10)
    idx = np.argsort(-np.abs(delta))[:3]
    assert damp.indices.tolist() == idx.tolist()
    s2 = s.copy()
    s2[idx] *= 0.2
    W = edited_weight(torch.from_numpy(U), dec, damp.indices, damp.sigma_new)
    np.testing.assert_allclose(W.numpy(), A @ np.diag(s2) @ Vt, atol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(W.numpy(), compute_uv=False), np.sort(s2)[::-1], atol=1e-10)
    signed = dampen(dec, tox, non, k=3, alpha=0.2, rank="signed")
    assert signed.indices.tolist() == np.argsort(-delta)[:3].tolist()


def test_projections_are_vt_times_h_not_vt_transposed():
    rng = np.random.default_rng(1)
    U = torch.from_numpy(rng.normal(size=(30, 6)))
    dec = svd(U)
    h = torch.from_numpy(rng.normal(size=6))
    p = projections(dec.Vt, h[None])[0]
    np.testing.assert_allclose(p.numpy(), dec.Vt.numpy() @ h.numpy(), atol=1e-12)
    assert not np.allclose(p.numpy(), dec.Vt.numpy().T @ h.numpy())  # the public code's defect
    # p are the coordinates that s scales: U h == A diag(s) p
    np.testing.assert_allclose(((dec.A * dec.s) @ p).numpy(), U.numpy() @ h.numpy(), atol=1e-10)


def test_choose_k():
    assert choose_k(576, percentile=0.75) == 144 and choose_k(576, percentile=0.999) == math.ceil(0.576)
    assert choose_k(4096, percentile=0.999) == 5 and choose_k(32, k=7) == 7
    with pytest.raises(EigenShiftError, match=r"k=33 directions is out of range: the hidden size is d=32"):
        choose_k(32, k=33)
    with pytest.raises(EigenShiftError, match="percentile must be in"):
        choose_k(32, percentile=1.5)


@contextmanager
def _applied(iv, m, **opts):
    """The unembedding that the logits under ``iv.apply(m, **opts)`` amount to: the unembedding module
    (with apply's hook) run on the identity."""
    with iv.apply(m, **opts), torch.no_grad():
        yield m.unembed_module(torch.eye(m.d_model)[None])[0].T


def _fit(m, k=4, alpha=0.0, seed=0):
    tox, non = _states(m.d_model, seed=seed)
    return EigenShift.fit(m, (tox.float(), non.float()), k=k, alpha=alpha)


def test_apply_corrects_the_logits_and_touches_no_weight():
    m = tiny_model("llama")  # tied embeddings
    assert m.tied()
    emb, U0, param = m.hf.get_input_embeddings().weight, m.W_U.detach().clone(), m.W_U
    iv = _fit(m)
    enc = m.encode(["hello world"])
    with torch.no_grad():
        with sl.record(m, ["final"], "all") as rec:
            base = m.hf(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits
        with iv.apply(m):
            assert m.tied() and m.hf.get_input_embeddings().weight is emb and m.W_U is param
            assert torch.equal(emb, U0)  # no weight changes: the logits are corrected by a hook
            edited = m.hf(**{k: enc[k] for k in ("input_ids", "attention_mask")}).logits
    # independent: logits = final states @ (A diag(s') Vt)^T
    A, s, Vt = np.linalg.svd(U0.double().numpy(), full_matrices=False)
    s2 = s.copy()
    s2[np.isclose(s[:, None], iv.sigma.double().numpy()[None], rtol=1e-5).any(1)] = 0.0  # alpha 0
    assert (s2 == 0).sum() == 4
    ref = rec["final"].double().numpy() @ (A @ np.diag(s2) @ Vt).T
    np.testing.assert_allclose(edited.double().numpy(), ref, atol=1e-4)
    assert not torch.allclose(base, edited)
    assert m.tied() and m.W_U is param and torch.equal(m.W_U, U0) and m.hf.config.tie_word_embeddings


def test_hook_removed_after_exception_inside_apply():
    m = tiny_model("qwen2")  # untied
    iv = _fit(m)
    enc = m.encode(["hello world"])
    with torch.no_grad():
        base = m.hf(**enc).logits
        with pytest.raises(RuntimeError, match="boom"):
            with iv.apply(m):
                assert not torch.allclose(m.hf(**enc).logits, base)
                raise RuntimeError("boom")
        assert torch.equal(m.hf(**enc).logits, base)


def test_save_load_recomputes_svd_and_checks_fingerprints(tmp_path):
    m = tiny_model("llama")
    iv = _fit(m, alpha=0.3)
    with _applied(iv, m) as W:
        W_fit = W.detach().clone()
    path = iv.save(tmp_path / "es.safetensors")
    back = I.load(path, m)
    assert isinstance(back, EigenShift) and back.indices.tolist() == iv.indices.tolist()
    with _applied(back, m) as W:
        assert torch.allclose(W, W_fit, atol=1e-6)
    with _applied(back, m, alpha=1.0) as W:  # alpha 1: no change
        assert torch.allclose(W, m.hf.get_input_embeddings().weight, atol=1e-5)
    other = tiny_model("llama", seed=1)
    with pytest.raises(I.InterventionError, match="fitted on model 'tiny-llama'.*not on"):
        I.load(path, other)
    with pytest.raises(EigenShiftError, match="singular values .* this edit was fitted on another matrix"):
        with I.load(path, other, strict=False).apply(other, strict=False):
            pass
    wide = EigenShift(iv.indices, iv.sigma, iv.delta, meta={**iv.meta, "d_model": 64})
    with pytest.raises(EigenShiftError, match=r"unembedding of \[98, 64\]; tiny-llama has \[98, 32\]"):
        wide.check(m, strict=False)


def test_fit_bad_inputs():
    m = tiny_model("llama")
    tox, non = _states(m.d_model)
    with pytest.raises(EigenShiftError, match="k=40 directions is out of range: the hidden size is d=32"):
        EigenShift.fit(m, (tox.float(), non.float()), k=40)
    with pytest.raises(StateCollectionError, match=r"found 3 toxic and 24 non-toxic states; EigenShift needs at "
                       r"least 8 of each: use more prompts \(--n-prompts\)"):
        EigenShift.fit(m, (tox[:3].float(), non.float()))
    with pytest.raises(EigenShiftError, match=r"toxic states have shape \(24, 5\)"):
        EigenShift.fit(m, (tox[:, :5].float(), non[:, :5].float()), k=2)
    with pytest.raises(EigenShiftError, match="alpha must be in"):
        EigenShift.fit(m, (tox.float(), non.float()), alpha=2.0)


def test_collect_states_greedy_first_tokens_and_too_few_toxic():
    m = tiny_model("llama")
    prompts = ["hello world", "steer me", "a b c", "the fox"]
    cfg = GenConfig(max_new_tokens=4, sampling="greedy")
    with pytest.raises(StateCollectionError, match=r"found 0 toxic and 4 non-toxic states from 4 continuations "
                       r"\(0 toxic\) of 4 prompts; EigenShift needs at least 8 of each: use more prompts"):
        collect_states(m, prompts, cfg, scorer="profanity", progress=False)
    st = collect_states(m, prompts, cfg, scorer="profanity", min_states=0, progress=False)
    # greedy: every non-toxic continuation keeps the state of its first token = final at the last prompt token
    ref = sl.capture(m, sorted(prompts, key=lambda t: (len(t), t)), "final", "last")["final"]
    assert len(st.toxic) == 0 and st.stats["saliency"] == "lexicon"
    got = st.nontoxic[torch.argsort(st.nontoxic[:, 0])]
    assert torch.allclose(got, ref[torch.argsort(ref[:, 0])], atol=1e-4)


def test_toxic_states_from_given_positions():
    m = tiny_model("llama")
    st = ToxicStates(torch.randn(9, 32), torch.randn(9, 32))
    iv = EigenShift.fit(m, st, k=2)
    assert iv.meta["options"] == {"k": 2, "alpha": 0.1, "rank": "abs", "projection": "standard"} and len(iv.delta) == 32


def test_salient_words_and_first_token():
    words = salient_words(["you are a stupid idiot and I like cake", "shut up you moron"])
    assert {"stupid", "idiot"} <= words[0] and "cake" not in words[0] and "moron" in words[1]
    pieces = ["you", " are", " a", " stup", "id", " idiot"]
    assert first_word_token(pieces, {"stupid"}, str.split) == 3
    assert first_word_token(pieces, {"idiot"}, str.split) == 5
    assert first_word_token(pieces, {"cake"}, str.split) == -1


def test_cli_fit_too_few_states_and_generate_with_an_edit_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from steerlab.cli import app

    d = model_dir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"line {i} of text" for i in range(4)) + "\n")
    runner = CliRunner()
    r = runner.invoke(app, ["fit", "eigenshift", "--out", str(tmp_path / "es.safetensors"), "--model", str(d),
                            "--prompts", str(prompts), "--n-prompts", "0", "--samples", "2", "--max-new-tokens", "3",
                            "--scorer", "profanity"])
    assert r.exit_code == 2 and "found 0 toxic and" in r.output and "use more prompts" in r.output, r.output
    loaded = sl.load(str(d))
    es = _fit(loaded, k=6, alpha=0.0)
    es.save(tmp_path / "es.safetensors")
    out = tmp_path / "run"
    r = runner.invoke(app, ["generate", "--out", str(out), "--model", str(d), "--prompts", str(prompts),
                            "--max-new-tokens", "5", "--scorer", "none", "--intervention",
                            str(tmp_path / "es.safetensors")])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    with es.apply(loaded):
        py = sl.generation.generate(loaded, [p.text for p in sl.data.load_prompts(str(prompts))], max_new_tokens=5)
    plain = sl.generation.generate(loaded, [p.text for p in sl.data.load_prompts(str(prompts))], max_new_tokens=5)
    by_prompt = {r["prompt"]: r["continuation"] for r in rows}
    texts = [p.text for p in sl.data.load_prompts(str(prompts))]
    assert [by_prompt[t] for t in texts] == [c[0] for c in py] and py != plain


def test_report_marks_dampened_directions(tmp_path):
    import csv

    from steerlab.explain.lens import token_str
    from steerlab.steer.eigenshift_report import report

    m = tiny_model("llama")
    iv = _fit(m, k=3)
    png, table = report(m, iv, tmp_path, k=4)
    rows = list(csv.DictReader(open(table)))
    assert png.stat().st_size > 0 and [int(r["direction"]) for r in rows] == iv.indices.tolist()
    U = m.W_U.detach().double().numpy()
    Vt = svd(m.W_U).Vt.double().numpy()
    for r in rows:  # the tokens a direction raises most are the top entries of U b_i
        top = np.argsort(-(U @ Vt[int(r["direction"])]))[:4]
        assert r["raises"] == " ".join(token_str(m, int(i)) for i in top)


def test_apply_with_fewer_directions_uses_the_largest_delta_first():
    m = tiny_model("qwen2")  # d = 32
    tox, non = _states(m.d_model, seed=3, shift=torch.linspace(-2, 2, m.d_model, dtype=torch.float64))
    iv = EigenShift.fit(m, (tox.float(), non.float()), k=6, alpha=0.1)
    # independent: numpy SVD with the same sign convention, delta from b_i . h, the 2 largest |delta| removed
    U = m.W_U.detach().double().numpy()
    A, s, Vt = np.linalg.svd(U, full_matrices=False)
    sign = np.sign(Vt[np.arange(32), np.abs(Vt).argmax(1)])
    A, Vt = A * sign, Vt * sign[:, None]
    delta = (tox.numpy() @ Vt.T).mean(0) - (non.numpy() @ Vt.T).mean(0)
    s2 = s.copy()
    s2[np.argsort(-np.abs(delta))[:2]] = 0.0
    for opts in ({"k": 2, "alpha": 0.0}, {"percentile": 0.95, "alpha": 0.0}):  # ceil(32 * 0.05) = 2
        with _applied(iv, m, **opts) as W:
            np.testing.assert_allclose(W.detach().double().numpy(), A @ np.diag(s2) @ Vt, atol=2e-5)
    with _applied(iv, m) as W:  # all 6 at the fitted alpha
        s6 = s.copy()
        s6[np.argsort(-np.abs(delta))[:6]] *= 0.1
        np.testing.assert_allclose(W.detach().double().numpy(), A @ np.diag(s6) @ Vt, atol=2e-5)
    with pytest.raises(EigenShiftError, match="this edit holds 6 directions but k=7 asks for 7: refit"):
        with iv.apply(m, k=7):
            pass
    # bench: the k of the grid this edit holds (6 directions: k 1, 2, 4 at alpha 0 and 0.5 for t and 1, 4
    # at alpha 0 for |delta| in the quick grid; 1, 2, 4 at three alphas for both in the full one)
    from steerlab.experiments.recipes import recipe_for

    # (fitted from states at the first token only: no matched-positions settings)
    assert recipe_for("eigenshift").settings(iv, m, None, "quick") == [
        {"rank": "t", "positions": "first", "k": k, "alpha": a} for k in (1, 2, 4) for a in (0.0, 0.5)] + [
        {"rank": "abs", "positions": "first", "k": k, "alpha": 0.0} for k in (1, 4)]
    assert recipe_for("eigenshift").settings(iv, m, None, "full") == [
        {"rank": r, "positions": "first", "k": k, "alpha": a} for r in ("t", "abs") for k in (1, 2, 4)
        for a in (0.0, 0.25, 0.5)]
    assert torch.equal(m.W_U, torch.from_numpy(U).float())


def test_rank_t_is_welch_t_of_the_projections_against_scipy():
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(3)
    U = rng.normal(size=(50, 6))
    dec = svd(torch.from_numpy(U))
    tox = torch.from_numpy(rng.normal(size=(30, 6)) * np.array([5, 1, 1, 1, 1, 1]) + np.array([3, .5, 0, 0, 0, 0]))
    non = torch.from_numpy(rng.normal(size=(20, 6)) * np.array([5, 1, 1, 1, 1, 1]))
    damp = dampen(dec, tox, non, k=2, alpha=0.5, rank="t")
    pt, pn = tox.numpy() @ dec.Vt.numpy().T, non.numpy() @ dec.Vt.numpy().T
    t = ttest_ind(pt, pn, axis=0, equal_var=False).statistic
    assert damp.indices.tolist() == np.argsort(-np.abs(t))[:2].tolist()
    with pytest.raises(EigenShiftError, match="rank='t' needs at least 2"):
        dampen(dec, tox[:1], non, k=2, alpha=0.5, rank="t")
    with pytest.raises(EigenShiftError, match="abs.*signed.*t"):
        dampen(dec, tox, non, k=2, alpha=0.5, rank="z")


def _public_code_choice(W: np.ndarray, toxic: np.ndarray, nontoxic: np.ndarray, top_k: int) -> np.ndarray:
    """A numpy transcription of the public code's ranking (reconstruct.py): float32 numpy SVD, states
    projected with A = Vt.T, delta of the means, argsort, the top_k most positive."""
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    A = np.array(Vt.T)
    delta = np.mean(A @ toxic.T, axis=1) - np.mean(A @ nontoxic.T, axis=1)
    top = np.argsort(delta)[top_k:][::-1]
    return top[:top_k]


def test_public_projection_reproduces_the_public_code_and_differs_from_the_standard():
    m = tiny_model("llama")
    rng = np.random.default_rng(5)
    tox = rng.normal(size=(20, 32)).astype(np.float32) + rng.normal(size=32).astype(np.float32)
    non = rng.normal(size=(25, 32)).astype(np.float32)
    W = m.W_U.detach().float().numpy()
    for k in (1, 3, 8):
        pub = EigenShift.fit(m, (torch.from_numpy(tox), torch.from_numpy(non)), k=k, rank="signed",
                             projection="public")
        assert pub.indices.tolist() == _public_code_choice(W, tox, non, k).tolist()
        assert pub.meta["options"]["projection"] == "public"
    std = EigenShift.fit(m, (torch.from_numpy(tox), torch.from_numpy(non)), k=8, rank="signed")
    assert std.indices.tolist() != pub.indices.tolist()
    # the edit itself is the same operation: the saved singular values are the matrix's
    assert torch.allclose(pub.sigma, svd(m.W_U).s[pub.indices].float(), rtol=1e-4)
    with pytest.raises(EigenShiftError, match="unknown projection"):
        EigenShift.fit(m, (torch.from_numpy(tox), torch.from_numpy(non)), k=2, projection="transposed")


def test_matched_positions_draw_non_toxic_states_from_the_toxic_positions():
    from steerlab.steer.toxic_states import generate_with_states, matched_nontoxic

    m = tiny_model("llama")
    new, states = generate_with_states(m, ["hello world", "steer me", "a b c"], GenConfig(max_new_tokens=6))
    # greedy: every state's argmax is the token it produced, so the filter keeps all of them
    got = matched_nontoxic(m, [(new, states)], [3], seed=0)
    assert torch.equal(got, states[:, 3])
    got = matched_nontoxic(m, [(new, states)], [1, 4], seed=1)
    assert all(torch.equal(g, states[r, 1]) or torch.equal(g, states[r, 4]) for r, g in enumerate(got))
    with pytest.raises(StateCollectionError, match="needs toxic states to draw positions from"):
        matched_nontoxic(m, [(new, states)], [], seed=0)
    with pytest.raises(StateCollectionError, match="unknown positions"):
        collect_states(m, ["hi"], GenConfig(max_new_tokens=2), scorer="profanity", positions="middle")


def test_apply_rank_reranks_every_direction_from_the_saved_delta_and_t(tmp_path):
    m = tiny_model("llama")
    rng = np.random.default_rng(7)
    tox = torch.from_numpy(rng.normal(size=(30, 32)) * rng.uniform(0.2, 5, size=32) + rng.normal(size=32)).float()
    non = torch.from_numpy(rng.normal(size=(30, 32)) * rng.uniform(0.2, 5, size=32)).float()
    iv = EigenShift.fit(m, (tox, non), k=2, alpha=0.0)  # rank abs, two directions saved
    ref = EigenShift.fit(m, (tox, non), k=5, alpha=0.0, rank="t")
    assert EigenShift.fit(m, (tox, non), k=5).indices.tolist() != ref.indices.tolist()  # the ranks disagree
    back = I.load(iv.save(tmp_path / "es.safetensors"), m)  # t is saved with the edit
    for edit in (iv, back):
        with _applied(edit, m, rank="t", k=5) as W:
            got = W.detach().clone()
        with _applied(ref, m) as W:
            torch.testing.assert_close(got, W.detach())
    seven = EigenShift.fit(m, (tox, non), k=7, alpha=0.0)
    with _applied(seven, m) as W:
        want = W.detach().clone()
    with _applied(iv, m, rank="abs", k=7) as W:  # more than saved: re-ranked from delta
        torch.testing.assert_close(W.detach(), want)
    with pytest.raises(EigenShiftError, match="does not hold"):
        with EigenShift(iv.indices, iv.sigma, iv.delta, 0.0, dict(iv.meta)).apply(m, rank="t"):
            pass


def test_added_positions_rank_as_a_fit_on_those_states_would(tmp_path):
    m = tiny_model("llama")
    tox, first = _states(m.d_model, seed=0)
    _, matched = _states(m.d_model, seed=5, shift=torch.linspace(-1, 1, m.d_model, dtype=torch.float64))
    st = lambda non, where: ToxicStates(tox.float(), non.float(), {"positions": where})  # noqa: E731
    iv = EigenShift.fit(m, st(first, "first"), k=6, alpha=0.0, rank="t")
    ref = EigenShift.fit(m, st(matched, "matched"), k=6, alpha=0.0, rank="t")  # independent: fitted on them
    assert iv.positions == "first" and ref.positions == "matched"
    with pytest.raises(EigenShiftError, match="not 'matched': add them with add_positions"):
        with iv.apply(m, positions="matched"):
            pass
    iv.add_positions(m, st(matched, "matched"))
    torch.testing.assert_close(iv.alt["matched"][0], ref.delta)
    torch.testing.assert_close(iv.alt["matched"][1], ref.tstat)
    for rank, k in (("t", 3), ("abs", 6)):
        assert iv.order(m, rank, None, k, "matched").tolist() == ref.order(m, rank, None, k).tolist()
        with _applied(iv, m, rank=rank, k=k, positions="matched") as a:
            pass
        with _applied(ref, m, rank=rank, k=k) as b:
            torch.testing.assert_close(a, b)
    with _applied(iv, m, positions="first") as a:
        pass
    with _applied(iv, m) as b:  # the fitted positions: as before
        torch.testing.assert_close(a, b)
    # saved and loaded with its added statistics; the benchmark's grid then spans both positions
    back = I.load(iv.save(tmp_path / "e.safetensors"), m)
    assert back.order(m, "t", None, 3, "matched").tolist() == ref.order(m, "t", None, 3).tolist()
    from steerlab.experiments.recipes import recipe_for

    grid = recipe_for("eigenshift").settings(back, m, None, "quick")
    assert {(g["rank"], g["positions"]) for g in grid} == {("t", "first"), ("abs", "first"), ("t", "matched")}
    with pytest.raises(EigenShiftError, match="fitted on states at positions 'first' already"):
        iv.add_positions(m, st(first, "first"))
