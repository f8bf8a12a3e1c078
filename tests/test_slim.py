"""SLIM (steerlab.steer.slim): the Gaussian optimal-transport map and its chance constraint, the
probe-gated runtime edit against an independent computation, solver failures, files."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import norm

import steerlab as sl
from steerlab import interventions as I
from steerlab.explain import probes as pr
from steerlab.steer import slim as S
from tiny import tiny_model, token_by_token_logits


def _gaussian(d=5, seed=0):
    rng = np.random.default_rng(seed)
    L = rng.normal(size=(d, d)) * 0.5
    return rng, rng.normal(size=d), L @ L.T + 0.2 * np.eye(d)


def test_ot_map_reaches_target_and_satisfies_the_chance_constraint():
    rng, mu_hat, sig_hat = _gaussian()
    theta = rng.normal(size=5)
    theta0 = 1.5 - theta @ mu_hat  # the source mean is on the unsafe side (theta0 + theta.mu > 0)
    gamma = 0.3
    m = S.gaussian_ot_map(mu_hat, sig_hat, theta0, theta, gamma)
    X = rng.multivariate_normal(mu_hat, sig_hat, size=400_000)
    Y = X @ m["A"].T + m["b"]
    np.testing.assert_allclose(Y.mean(0), m["mu"], atol=0.02)
    np.testing.assert_allclose(np.cov(Y, rowvar=False), m["sigma"], atol=0.03)
    # chance constraint, analytically and empirically: P(theta0 + theta.y <= 0) >= 1 - gamma
    sd = np.sqrt(theta @ m["sigma"] @ theta)
    assert theta0 + theta @ m["mu"] + norm.ppf(1 - gamma) * sd <= 1e-4
    assert np.mean(theta0 + Y @ theta <= 0) >= 1 - gamma - 0.005
    assert np.sqrt(theta @ m["sigma"] @ theta) > 0.05  # z = Phi^-1(0.7) < 1: the spread along theta is kept
    # A is symmetric positive definite (a Brenier map) and pushes N(mu_hat, Sigma_hat) to N(mu*, Sigma*)
    np.testing.assert_allclose(m["A"], m["A"].T, atol=1e-6)
    np.testing.assert_allclose(m["A"] @ sig_hat @ m["A"].T, m["sigma"], atol=1e-5)


def test_ot_map_with_gamma_01_collapses_the_spread_along_the_probe():
    """With z = Phi^-1(1 - gamma) > 1 the program prefers removing the variance along theta (cost
    ~ theta_hat' Sigma theta_hat) to moving the mean z standard deviations (cost ~ z^2 times that): the
    target sits on the probe's boundary with (numerically) no spread across it."""
    rng, mu_hat, sig_hat = _gaussian()
    theta = rng.normal(size=5)
    theta0 = 1.5 - theta @ mu_hat
    m = S.gaussian_ot_map(mu_hat, sig_hat, theta0, theta, 0.1)
    assert theta @ m["sigma"] @ theta < 1e-6 and abs(theta0 + theta @ m["mu"]) < 1e-5
    Y = rng.multivariate_normal(mu_hat, sig_hat, size=100_000) @ m["A"].T + m["b"]
    assert np.mean(theta0 + Y @ theta <= 1e-5) >= 0.9


def test_ot_map_is_identity_when_already_safe():
    rng, mu_hat, sig_hat = _gaussian(seed=1)
    theta = rng.normal(size=5)
    theta0 = -10.0 - theta @ mu_hat
    m = S.gaussian_ot_map(mu_hat, sig_hat, theta0, theta, 0.1)
    np.testing.assert_allclose(m["A"], np.eye(5), atol=1e-4)
    np.testing.assert_allclose(m["b"], 0, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_equals_the_conic_program(seed):
    """The one-dimensional reduction against cvxpy + Clarabel on random instances: source means a
    little, moderately and very far on the unsafe side (the last one ends with no spread along theta),
    both gamma levels; the same optimum and objective, and the constraint holds."""
    rng = np.random.default_rng(seed)
    d = 3 + seed
    L = rng.normal(size=(d, d)) * rng.uniform(0.2, 2)
    sig, mu, theta = L @ L.T + 0.1 * np.eye(d), 3 * rng.normal(size=d), rng.normal(size=d) * rng.uniform(0.1, 5)
    R = S.sqrtm_psd(sig)
    for off, gamma in [(0.3, 0.1), (0.3, 0.3), (2.0, 0.3), (30.0, 0.1)]:
        theta0 = off * np.sqrt(theta @ sig @ theta) - theta @ mu
        z = norm.ppf(1 - gamma)
        mc, Sc = S.program_closed_form(mu, R, theta0, theta, z)
        mr, Sr = S.program_cvxpy(mu, R, theta0, theta, z)
        obj_c = np.sum((mc - mu) ** 2) + np.sum((Sc - R) ** 2)
        obj_r = np.sum((mr - mu) ** 2) + np.sum((Sr - R) ** 2)
        assert obj_c <= obj_r + 1e-5 * max(1.0, obj_r)
        np.testing.assert_allclose(mc, mr, atol=1e-4 * max(1.0, np.abs(mr).max()))
        np.testing.assert_allclose(Sc, Sr, atol=2e-4 * max(1.0, np.abs(Sr).max()))
        assert theta0 + theta @ mc + z * np.linalg.norm(Sc @ theta) <= 1e-8 * max(1.0, abs(theta0))
        assert np.linalg.eigvalsh(Sc).min() >= -1e-10  # the PSD constraint holds without being imposed
    m1 = S.gaussian_ot_map(mu, sig, theta0, theta, 0.1)
    m2 = S.gaussian_ot_map(mu, sig, theta0, theta, 0.1, solver="cvxpy")
    np.testing.assert_allclose(m1["sigma"], m2["sigma"], atol=1e-3 * np.abs(m2["sigma"]).max())
    with pytest.raises(S.SLIMError, match="unknown SLIM solver 'mosek'"):
        S.gaussian_ot_map(mu, sig, theta0, theta, 0.1, solver="mosek")


def test_a_head_whose_program_fails_is_named_and_the_rest_kept():
    """A real failure: head 1's probe has zero weights and a positive intercept (unsafe everywhere, the
    program is infeasible), head 2's activations contain NaN; head 0 is fitted."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(40, 3, 4))
    acts[5, 2, 1] = np.nan
    w = rng.normal(size=(3, 4))
    w[1] = 0
    b0 = np.array([1.0, 1.0, 1.0])
    flags = np.ones((40, 3), dtype=bool)
    with pytest.warns(UserWarning, match="layer 7 head 1: the program is infeasible"):
        A, b, failed = S.fit_head_maps(acts, flags, w, b0, 7, 0.1, 0.1)
    assert sorted(failed) == [1, 2] and "layer 7 head 2: the flagged activations contain NaN" in failed[2]
    np.testing.assert_array_equal(A[1], np.eye(4))
    mu, sig = S.head_gaussian(acts[:, 0], 0.1)
    want = S.gaussian_ot_map(mu, sig, 1.0, w[0], 0.1)
    np.testing.assert_allclose(A[0], want["A"]) and np.testing.assert_allclose(b[0], want["b"])
    w[:] = 0
    with pytest.raises(S.SLIMError, match="could not fit any head of layer 7"), pytest.warns(UserWarning):
        S.fit_head_maps(acts, flags, w, b0, 7, 0.1, 0.1)


def test_too_few_samples_and_bad_gamma():
    with pytest.raises(S.SLIMError, match="layer 3 head 1: 1 flagged activations are too few for a covariance"):
        S.head_gaussian(np.ones((1, 4)), what="layer 3 head 1")
    _, mu, sig = _gaussian()
    with pytest.raises(S.SLIMError, match="gamma must be in"):
        S.gaussian_ot_map(mu, sig, 0.0, np.ones(5), gamma=0.7)


def _made_up(m, layer=1, tau=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, d = m.n_heads, m.d_head
    params = {"w": torch.randn(H, d, generator=g), "b0": torch.tensor([0.5, 0.5, -0.2, 3.0]),
              "A": torch.eye(d) + 0.2 * torch.randn(H, d, d, generator=g), "b": torch.randn(H, d, generator=g),
              "active": torch.tensor([True, True, True, False])}
    return S.SLIM(params, {"model": m.name, "layer": layer, "tau": tau})


def test_runtime_edit_matches_an_independent_computation(llama):
    iv = _made_up(llama)
    site = "blocks.1.attn.heads"
    enc = llama.encode(["hello world", "a b", "The quick brown fox!"])
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}
    sites = [f"blocks.{i}.attn.heads" for i in range(3)]
    with sl.record(llama, sites, "all") as base:
        llama.hf(**ids)
    with iv.apply(llama, kappa=0.7), sl.record(llama, sites, "all") as new:
        llama.hf(**ids)
    torch.testing.assert_close(new["blocks.0.attn.heads"], base["blocks.0.attn.heads"], rtol=0, atol=0)
    torch.testing.assert_close(new[site][:, :-1], base[site][:, :-1], rtol=0, atol=0)
    a = base[site][:, -1].double().numpy()  # [B, H, d]
    P = {k: v.double().numpy() for k, v in iv.params.items() if k != "active"}
    want, fired = a.copy(), 0
    for r in range(a.shape[0]):
        p = 1 / (1 + np.exp(-((a[r] * P["w"]).sum(-1) + P["b0"])))
        if (p > 0.5).sum() >= 2:
            fired += 1
            for h in range(4):
                if p[h] > 0.5 and h != 3:
                    want[r, h] = a[r, h] + 0.7 * p[h] * (P["A"][h] @ a[r, h] + P["b"][h] - a[r, h])
    np.testing.assert_allclose(new[site][:, -1].double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert 0 < fired and iv.fire_rate == pytest.approx(fired / 3)
    assert int(iv.calls) == 3


def test_fit_on_a_tiny_model_keeps_heads_whose_program_fails(llama, monkeypatch):
    words = ["calm", "kind", "warm", "nice", "rude", "vile", "mean", "nasty"]
    texts = [f"{words[i % 8]} {i} {words[(i * 3) % 8]}" for i in range(60)]
    lab = pr.labelled_from_texts(texts, [int(t.split()[0] in words[4:]) for t in texts], validation=0.3)
    data = pr.probe_data(llama, lab)
    real = S.gaussian_ot_map

    def flaky(mu, sig, t0, th, gamma, what, solver):
        if what.endswith("head 1"):
            raise S.SLIMError(f"{what}: the conic solver failed (simulated)")
        return real(mu, sig, t0, th, gamma, what, solver)

    monkeypatch.setattr(S, "gaussian_ot_map", flaky)
    with pytest.warns(UserWarning, match="head 1: the conic solver failed"):
        iv = S.SLIM.fit(llama, data, layer=2, epochs=100, shrink=0.2)
    assert iv.layer == 2 and "1" in {str(k) for k in iv.meta["failed_heads"]}
    assert not bool(iv.params["active"][1]) and torch.equal(iv.params["A"][1], torch.eye(8))
    rp = pr.risk_probes(data, epochs=100)
    torch.testing.assert_close(iv.params["w"], rp.w[2].cpu())
    assert iv.tau == int(rp.tau[2])


def test_files_and_other_models(tmp_path, llama):
    iv = _made_up(llama)
    path = iv.save(tmp_path / "slim.safetensors")
    back = I.load(path, llama, strict=False)
    assert isinstance(back, S.SLIM) and back.layer == 1 and back.tau == 2
    for k, v in iv.params.items():
        assert torch.equal(back.params[k], v)
    with pytest.raises(I.InterventionError, match="'tiny-gpt2' has 2 layers of 4 heads x 8"):
        _made_up(llama, layer=2).check(tiny_model("gpt2"), strict=False)
    iv.meta["model_fingerprint"] = llama.fingerprint
    with pytest.raises(I.InterventionError, match="fitted on model 'tiny-llama'"):
        iv.check(tiny_model("llama", seed=1))
    with pytest.raises(S.SLIMError, match="missing"):
        S.SLIM({"w": torch.zeros(4, 8)}, {"layer": 1, "tau": 1})


def test_probe_activations_of_another_model_are_refused(llama):
    lab = pr.labelled_from_texts([f"word {i}" for i in range(12)], [i % 2 for i in range(12)], validation=0.3)
    data = pr.probe_data(llama, lab)
    other = tiny_model("llama", seed=1)
    with pytest.raises(pr.ProbeError, match="captured on 'tiny-llama' .* capture them on this model"):
        S.SLIM.fit(other, data, epochs=5)
    with pytest.raises(S.SLIMError, match="unknown SLIM solver 'mosek'; choose one of closed, cvxpy"):
        S.SLIM.fit(llama, data, solver="mosek")
    with pytest.raises(pr.ProbeError, match="heads x d_head \\(4, 8\\)"):
        I.fit("iti", tiny_model("gpt2"), data, k=1)


def test_every_position_edit_equals_token_by_token_last_position_edits(llama):
    """``where="all"`` on one teacher-forced pass gives the logits that feeding the same tokens one
    call at a time (KV cache, the method's ``last`` schedule) gives: what generation sees."""
    iv = _made_up(llama, tau=1)
    ids = llama.encode(["The quick brown fox jumps"])["input_ids"]
    with torch.no_grad(), iv.apply(llama, kappa=0.8, where="all"):
        full = llama.hf(input_ids=ids).logits[0]
    fired_all = int(iv.fired)
    iv.reset_counts()
    with iv.apply(llama, kappa=0.8):
        steps = token_by_token_logits(llama, ids)
    torch.testing.assert_close(full, steps, rtol=1e-4, atol=1e-5)
    assert int(iv.calls) == ids.shape[1] and int(iv.fired) == fired_all > 0
    with torch.no_grad():
        plain = llama.hf(input_ids=ids).logits[0]
    assert not torch.allclose(plain, full)


def test_layer_chosen_by_the_edits_effect_among_layers_within_one_se_of_the_best(llama):
    words = ["calm", "kind", "warm", "nice", "rude", "vile", "mean", "nasty"]
    texts = [f"{words[i % 8]} {i} {words[(i * 3) % 8]}" for i in range(60)]
    lab = pr.labelled_from_texts(texts, [int(t.split()[0] in words[4:]) for t in texts], validation=0.3)
    data = pr.probe_data(llama, lab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iv = S.SLIM.fit(llama, data, epochs=100, shrink=0.2)
        by_risk = S.SLIM.fit(llama, data, epochs=100, shrink=0.2, layer_choice="risk")
    sel = iv.meta["layer_selection"]
    rp = pr.risk_probes(data, epochs=100)
    # candidates: exactly the layers whose risk is within the bound, the bound at least the best risk
    assert sel["risk_bound"] >= float(rp.layer_risk.min()) - 1e-6
    assert sorted(sel["candidates"]) == [lay for lay, r in zip(data.layers, rp.layer_risk.tolist())
                                         if r <= sel["risk_bound"] + 1e-6]
    margins = {lay: c["margin"] for lay, c in sel["candidates"].items()}
    assert iv.layer == max(margins, key=lambda k: (margins[k], -k))
    assert by_risk.layer == rp.layer and "layer_selection" not in by_risk.meta
    # the shift measured without a forward pass equals what the runtime edit does to those activations
    li = data.layers.index(iv.layer)
    a = data.heads["validation"][li]
    p = iv.params
    shift = S.edit_shift(a, p["w"], p["b0"], iv.tau, p["A"], p["b"], p["active"], kappa=0.6)
    new, _ = _bound_edit(iv, 0.6).move(a[:, None])
    want = (new[:, 0] - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    torch.testing.assert_close(shift, want)
    with pytest.raises(S.SLIMError, match="unknown SLIM layer choice"):
        S.SLIM.fit(llama, data, epochs=5, layer_choice="depth")


def _bound_edit(iv, kappa):
    fn = S.SLIMEdit(iv, kappa)
    fn.bind(S.heads_site(iv.layer), None, torch.device("cpu"), torch.float32)
    return fn


def test_risk_se_is_agresti_coull_and_never_zero():
    from steerlab.steer.slim import risk_se

    y = torch.tensor([1] * 10 + [0] * 20).bool()
    perfect = y.clone()                       # no error at all
    two_off = y.clone()
    two_off[0] = False                        # one missed toxic row
    two_off[15] = True                        # one false detection
    se = risk_se(torch.stack([perfect, two_off]), y)
    # by hand: FPR~ = (0 + 2) / 24, FNR~ = (0 + 2) / 14; then (1 + 2) / 24 and (1 + 2) / 14
    hand = [math.sqrt(p * (1 - p) / 24 + q * (1 - q) / 14) for p, q in ((2 / 24, 2 / 14), (3 / 24, 3 / 14))]
    assert se.tolist() == pytest.approx(hand)
    # an error-free layer is not certain: one missed row of 10 toxic ones (risk 0.1) lies within its 1 SE
    assert float(se[0]) > 0.1
