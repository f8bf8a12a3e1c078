"""Batched probes on heads and residual streams (steerlab.explain.probes), checked against sklearn
and brute-force computations."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import steerlab as sl
from steerlab.explain import probes as pr
from tiny import tiny_model


def _synthetic(P=6, n=160, nv=80, D=12, seed=0):
    """P problems sharing labels; problem p separates the classes with margin shrinking in p."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n + nv, generator=g) < 0.45).float()
    X = torch.randn(P, n + nv, D, generator=g) * torch.linspace(0.5, 3.0, D)
    dirs = torch.randn(P, D, generator=g)
    X = X + (1.5 / (1 + torch.arange(P)))[:, None, None] * y[None, :, None] * dirs[:, None, :] + 2.0
    return X[:, :n], y[:n], X[:, n:], y[n:]


def test_batched_logistic_matches_sklearn():
    X, y, Xv, yv = _synthetic()
    l2 = 1e-2
    probes = pr.fit_logistic(X, y, l2)
    ours = pr.accuracy(probes.logits(Xv), yv).numpy()
    for p in range(X.shape[0]):
        x, xv = X[p].double().numpy(), Xv[p].double().numpy()
        mu, sd = x.mean(0), x.std(0)
        clf = LogisticRegression(C=1.0 / (len(x) * l2), max_iter=10000, tol=1e-10).fit((x - mu) / sd, y.numpy())
        sk_acc = clf.score((xv - mu) / sd, yv.numpy())
        assert abs(ours[p] - sk_acc) <= 0.01 + 1e-9
        np.testing.assert_allclose(probes.w[p].numpy(), clf.coef_[0] / sd, rtol=1e-3, atol=1e-4)


def test_wide_head_probes_fit_with_several_threads():
    """72 problems of 256 features (Gemma-3-270M's 18 layers x 4 heads of 256): batched LU failed on
    CPU with 2 MKL threads ("Pivots given to lu_solve ..."); the Cholesky solve fits them and agrees
    with numpy's solve, and its ridge fallback rescues a singular system."""
    threads = torch.get_num_threads()
    X, y, Xv, yv = _synthetic(P=72, n=90, nv=38, D=256)
    torch.set_num_threads(1)
    one = pr.fit_logistic(X, y)
    torch.set_num_threads(2)
    try:
        probes = pr.fit_logistic(X, y)
        assert torch.isfinite(probes.w).all() and (pr.accuracy(probes.logits(Xv), yv)[:4] == 1).all()
        torch.testing.assert_close(probes.w, one.w, rtol=1e-3, atol=1e-4)
        g = torch.Generator().manual_seed(3)
        A = torch.randn(72, 257, 257, generator=g)
        H, b = A @ A.transpose(1, 2) / 257 + 0.1 * torch.eye(257), torch.randn(72, 257, generator=g)
        np.testing.assert_allclose(pr.spd_solve(H, b).numpy(),
                                   np.linalg.solve(H.double().numpy(), b.double().numpy()[..., None])[..., 0],
                                   rtol=1e-3, atol=1e-3)
    finally:
        torch.set_num_threads(threads)
    singular = torch.zeros(2, 3, 3)
    singular[0] = torch.eye(3)
    out = pr.spd_solve(singular, torch.ones(2, 3))
    assert torch.equal(out[0], torch.ones(3)) and torch.isfinite(out[1]).all()


def test_auroc_and_risk_against_independent_computations():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (4, 30), generator=g).float()  # many ties
    y = (torch.rand(30, generator=g) < 0.5).float()
    ours = pr.auroc(scores, y).numpy()
    for p in range(4):
        assert ours[p] == pytest.approx(roc_auc_score(y.numpy(), scores[p].numpy()), abs=1e-6)
    flag = scores > 2
    yy = y.bool().numpy()
    for p in range(4):
        f = flag[p].numpy()
        fpr, fnr = (f & ~yy).sum() / (~yy).sum(), (~f & yy).sum() / yy.sum()
        assert float(pr.risk(flag, y, b=2.0)[p]) == pytest.approx(fpr + 2.0 * fnr, abs=1e-6)


def test_risk_probe_learns_and_reports_its_validation_risk():
    X, y, Xv, yv = _synthetic(P=3)
    probes, epoch, vrisk = pr.fit_risk_probe(X, y, Xv, yv, b=1.0, epochs=300)
    flag = (torch.einsum("pnd,pd->pn", Xv, probes.w) + probes.b[:, None]).numpy() > 0
    yy = yv.bool().numpy()
    indep = (flag & ~yy).sum(1) / (~yy).sum() + (~flag & yy).sum(1) / yy.sum()
    np.testing.assert_allclose(vrisk.numpy(), indep, atol=1e-5)
    assert vrisk[0] < 0.2 and (vrisk <= 1.0 + 1e-6).all()  # epoch 0 (p = 0.5: flag nothing) has risk 1
    assert epoch.shape == (3,) and int(epoch.max()) <= 300


def test_vote_threshold_brute_force():
    g = torch.Generator().manual_seed(2)
    fires = torch.rand(3, 5, 40, generator=g) < torch.linspace(0.2, 0.8, 40)
    y = (torch.linspace(0.2, 0.8, 40) + 0.3 * torch.rand(40, generator=g) > 0.6).float()
    tau, rk = pr.vote_threshold(fires, y, b=1.0)
    for layer in range(3):
        counts = fires[layer].sum(0).numpy()
        risks = []
        for t in range(0, 5):  # 0..H-1, the paper's range
            f, yy = counts >= t, y.bool().numpy()
            risks.append((f & ~yy).sum() / (~yy).sum() + (~f & yy).sum() / yy.sum())
        assert int(tau[layer]) == int(np.argmin(risks)) and float(rk[layer]) == pytest.approx(min(risks))


def test_choose_layer_breaks_ties_by_mean_head_risk():
    layer_risk = torch.tensor([0.3, 0.105, 0.2, 0.105, 0.105])
    head_risk = torch.tensor([[0.1, 0.1], [0.5, 0.4], [0.0, 0.0], [0.3, 0.4], [0.45, 0.45]])
    # layers 1, 3 and 4 tie at 0.105; their mean head risks are 0.45, 0.35, 0.45: layer 3 (layer 2's
    # lower head risk does not count, its vote risk is higher)
    assert pr.choose_layer(layer_risk, head_risk) == 3
    # no tie: the lowest vote risk whatever the heads; a full tie on both: the first
    assert pr.choose_layer(torch.tensor([0.2, 0.1]), torch.tensor([[0.0], [0.9]])) == 1
    assert pr.choose_layer(torch.tensor([0.1, 0.1]), torch.tensor([[0.2], [0.2]])) == 0


def test_labelled_bad_inputs():
    with pytest.raises(pr.ProbeError, match="train: a probe needs both classes.*only label 1"):
        pr.Labelled((["a", "b"], [1, 1]), (["c", "d"], [0, 1]))
    with pytest.raises(pr.ProbeError, match="1 texts are in both"):
        pr.Labelled((["a", "b"], [0, 1]), (["b", "d"], [0, 1]))
    with pytest.raises(pr.ProbeError, match="labels must be 0 or 1"):
        pr.Labelled((["a", "b"], [0, 2]), (["c", "d"], [0, 1]))
    X = torch.randn(2, 10, 3)
    with pytest.raises(pr.ProbeError, match="single class"):
        pr.fit_logistic(X, torch.zeros(10))
    with pytest.raises(pr.ProbeError, match="too few"):
        pr.fit_logistic(X[:, :3], torch.tensor([0.0, 1.0, 0.0]))


def test_labelled_from_texts_splits_by_prompt():
    texts = [f"text {i}" for i in range(40)] + ["text 0"]  # a repeated text counts once
    labels = [i % 2 for i in range(40)] + [1]
    lab = pr.labelled_from_texts(texts, labels, validation=0.25, seed=3)
    assert not set(lab.train[0]) & set(lab.validation[0])
    assert sorted(lab.train[0] + lab.validation[0]) == sorted(set(texts))
    assert lab.counts() == {"train": [15, 15], "validation": [5, 5]}
    assert dict(zip(*lab.train))["text 0"] == 0


class _LenScorer:
    name = "length"

    def toxicity(self, texts):
        return np.array([len(t) for t in texts], dtype=float)


def test_toxicity_labels_take_the_ends_of_the_ranking():
    lab = pr.toxicity_labels("rtp", _LenScorer(), n_train=10, n_val=5)
    parts = sl.data.split(sl.data.load_prompts("rtp"), seed=0)
    for name, (texts, labels) in (("train", lab.train), ("validation", lab.validation)):
        lengths = sorted(len(p.text) for p in parts[name])
        n = len(texts) // 2
        assert [len(t) for t, y in zip(texts, labels) if y == 1] == sorted(lengths[-n:], reverse=True)
        assert sorted(len(t) for t, y in zip(texts, labels) if y == 0) == lengths[:n]
        assert set(texts) <= {p.text for p in parts[name]}


def test_probe_data_and_heads_on_a_tiny_model(tmp_path):
    m = tiny_model("llama")
    texts = [f"{w} {i}" for i, w in enumerate(["good", "bad"] * 12)]
    lab = pr.labelled_from_texts(texts, [i % 2 for i in range(24)], validation=0.3)
    data = pr.probe_data(m, lab)
    L, H, dh = m.n_layers, m.n_heads, m.d_head
    assert data.heads["train"].shape == (L, len(lab.train[0]), H, dh)
    direct = sl.capture(m, lab.validation[0], "blocks.1.attn.heads", "last")["blocks.1.attn.heads"]
    torch.testing.assert_close(data.heads["validation"][1], direct)
    res = pr.probe_heads(data)
    assert res.head_acc.shape == (L, H) and res.resid_acc.shape == (L,)
    # the probe of head (1, 2) alone, fitted independently, has the same validation accuracy
    one = pr.fit_logistic(data.heads["train"][1, :, 2][None], data.labels["train"])
    acc = pr.accuracy(one.logits(data.heads["validation"][1, :, 2][None]), data.labels["validation"])
    assert float(acc[0]) == pytest.approx(float(res.head_acc[1, 2]))
    top = res.top_heads(3)
    assert float(res.head_acc[top[0]]) == float(res.head_acc.max()) and len(set(top)) == 3
    with pytest.raises(pr.ProbeError, match="k must be between 1 and 12"):
        res.top_heads(13)
    path = pr.heatmap(res, tmp_path / "h.png")
    assert path.stat().st_size > 1000 and res.to_dict()["head_accuracy"][1][2] == round(float(res.head_acc[1, 2]), 4)
    rp = pr.risk_probes(data, epochs=50)
    assert rp.w.shape == (L, H, dh) and rp.layer in data.layers and 0 <= int(rp.tau.min()) <= int(rp.tau.max()) <= H - 1
