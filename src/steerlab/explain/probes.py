"""Linear probes on every attention head and every residual stream of a model (ITI and SLIM,
METHODS.md section 5).

- :class:`Labelled`: texts with binary labels (1 = undesirable, e.g. toxic), already split by
  prompt into a training and a validation part (no text in both).
- :func:`probe_data`: one :func:`steerlab.capture` over all layers: ``blocks.{l}.attn.heads``
  (the input of the attention output projection, ``[H, d_head]``) and ``blocks.{l}.resid_post`` at
  the last token.
- :func:`fit_logistic`: L2-regularised logistic regression for ``P`` independent problems at once
  (``X [P, N, D]``), by batched Newton steps with a vectorised backtracking line search on
  standardised features; weights are returned in activation coordinates.
- :func:`fit_risk_probe`: SLIM's risk-aware probe: the smooth surrogate ``FPR + b * FNR`` minimised
  by full-batch Adam (lr 2e-3) for all problems at once, keeping each problem's best epoch on the
  validation risk.
- :func:`probe_heads` (accuracy and AUROC per head and per layer), :func:`risk_probes` (the head
  vote classifier with ``tau`` chosen on validation and the layer to edit), :func:`heatmap`.

No loop in this module runs over heads or layers: every problem is a slice of one tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import SteerlabError
from ..hooks import capture
from ..models.model import Model


class ProbeError(SteerlabError):
    """Labelled data or activations that cannot train a probe (one class, too few texts, leakage)."""


# --- labelled data ---------------------------------------------------------------------------------
@dataclass
class Labelled:
    """Binary-labelled texts split by prompt: ``train`` and ``validation`` are ``(texts, labels)``
    with label 1 for the undesirable class (toxic) and 0 for the desirable one."""

    train: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]]
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("train", "validation"):
            texts, labels = getattr(self, name)
            texts, labels = list(texts), [int(v) for v in labels]
            if len(texts) != len(labels):
                raise ProbeError(f"{name}: {len(texts)} texts but {len(labels)} labels")
            if set(labels) - {0, 1}:
                raise ProbeError(f"{name}: labels must be 0 or 1, got {sorted(set(labels) - {0, 1})}")
            if len(set(labels)) < 2:
                have = f"only label {labels[0]}" if labels else "no texts"
                raise ProbeError(f"{name}: a probe needs both classes (0 and 1), got {have} "
                                 f"({len(texts)} texts)")
            setattr(self, name, (texts, labels))
        both = set(self.train[0]) & set(self.validation[0])
        if both:
            raise ProbeError(f"{len(both)} texts are in both the training and the validation part (split by "
                             f"prompt to avoid leakage), e.g. {next(iter(both))!r}")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for texts, labels in (self.train, self.validation):
            for t, y in zip(texts, labels):
                h.update(f"{y}\0{t}\0".encode())
            h.update(b"\1")
        return h.hexdigest()[:16]

    def counts(self) -> dict[str, list[int]]:
        """``{part: [n label 0, n label 1]}``."""
        return {k: [v[1].count(0), v[1].count(1)] for k, v in (("train", self.train), ("validation", self.validation))}


def labelled_from_texts(texts: Sequence[str], labels: Sequence[int], validation: float = 0.3, seed: int = 0,
                        source: str = "") -> Labelled:
    """Split labelled texts by prompt (repeated texts count once, with their first label), stratified
    by label, ``validation`` of each class to the validation part."""
    first: dict[str, int] = {}
    for t, y in zip(texts, labels, strict=True):
        first.setdefault(t, int(y))
    rng = np.random.default_rng(seed)
    train, val = ([], []), ([], [])
    for cls in (0, 1):
        members = [t for t, y in first.items() if y == cls]
        rng.shuffle(members)
        n_val = int(round(validation * len(members)))
        for part, chunk in ((val, members[:n_val]), (train, members[n_val:])):
            part[0].extend(chunk)
            part[1].extend([cls] * len(chunk))
    return Labelled(train, val, source)


def toxicity_labels(prompts: str = "rtp", scorer=None, n_train: int = 64, n_val: int = 32, seed: int = 0) -> Labelled:
    """Toxic vs non-toxic prompts: the training and validation parts of the seeded 60/20/20 split by
    prompt (test prompts are never used), each scored by ``scorer`` (default scorer), and in each part
    the ``n`` most toxic texts labelled 1 and the ``n`` least toxic labelled 0 (the two ends of the
    ranking, not a threshold: few RealToxicityPrompts prefixes score above 0.5)."""
    from ..data import load_prompts, split
    from ..scoring import get_scorer

    parts = split(load_prompts(prompts), seed=seed)
    sc = scorer if scorer is not None else get_scorer()
    out = {}
    for name, n in (("train", n_train), ("validation", n_val)):
        texts = [p.text for p in parts[name]]
        if 2 * n > len(texts):
            raise ProbeError(f"{prompts}:{name} has {len(texts)} prompts; cannot take {n} per class")
        order = np.argsort(np.asarray(sc.toxicity(texts)), kind="stable")
        idx = list(order[:n]) + list(order[::-1][:n])
        out[name] = ([texts[i] for i in idx], [0] * n + [1] * n)
    return Labelled(out["train"], out["validation"], source=f"{prompts} train/validation, ranked by {sc.name}")


# --- activations -----------------------------------------------------------------------------------
@dataclass
class ProbeData:
    """Last-token activations of a :class:`Labelled` set, keyed by part (``train``, ``validation``):
    ``heads[part]`` ``[L, N, H, d_head]``, ``resid[part]`` ``[L, N, d_model]`` (or absent),
    ``labels[part]`` ``[N]`` float, for ``layers``."""

    layers: list[int]
    heads: dict[str, torch.Tensor]
    resid: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def check(self, model: Model) -> None:
        """Raise when these activations were captured on another model than ``model`` (fingerprint,
        or heads x d_head when no fingerprint was recorded): probes fitted on them would not fit it."""
        fp = self.meta.get("model_fingerprint")
        shape = tuple(self.heads["train"].shape[2:])
        if (fp is not None and fp != model.fingerprint) or shape != (model.n_heads, model.d_head):
            raise ProbeError(f"these probe activations were captured on {self.meta.get('model', '?')!r} "
                             f"(fingerprint {fp}, heads x d_head {shape}), not on {model.name!r} (fingerprint "
                             f"{model.fingerprint}, {model.n_heads} x {model.d_head}): capture them on this model")


def probe_data(model: Model, data: Labelled, layers: Sequence[int] | None = None, resid: bool = True,
               batch_size: int = 16, chat: bool = False) -> ProbeData:
    """Capture head (and residual) activations at the last token for every text, all layers in one
    :func:`steerlab.capture`; everything stays on the model's device."""
    layers = list(range(model.n_layers)) if layers is None else [model.site(f"blocks.{i}.resid_post").layer
                                                                 for i in layers]
    if not layers:
        raise ProbeError("probe_data needs at least one layer")
    head_sites = [f"blocks.{i}.attn.heads" for i in layers]
    res_sites = [f"blocks.{i}.resid_post" for i in layers] if resid else []
    texts = data.train[0] + data.validation[0]
    caps = capture(model, texts, head_sites + res_sites, "last", batch_size=batch_size, chat=chat)
    n = len(data.train[0])
    cut = {"train": slice(0, n), "validation": slice(n, None)}
    heads = {k: torch.stack([caps[s][sl] for s in head_sites]) for k, sl in cut.items()}
    res = {k: torch.stack([caps[s][sl] for s in res_sites]) for k, sl in cut.items()} if resid else {}
    labels = {k: torch.tensor(getattr(data, k)[1], dtype=torch.float32, device=model.device) for k in cut}
    from ..interventions import text_ids

    meta = {"model": model.name, "model_fingerprint": model.fingerprint, "data_fingerprint": data.fingerprint(),
            "data_text_ids": text_ids(texts), "source": data.source, "counts": data.counts()}
    return ProbeData(layers, heads, res, labels, meta)


# --- batched probes --------------------------------------------------------------------------------
@dataclass
class LinearProbes:
    """``P`` linear classifiers in activation coordinates: ``logit = x . w[p] + b[p]``."""

    w: torch.Tensor  # [P, D]
    b: torch.Tensor  # [P]

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """``X [P, N, D]`` -> ``[P, N]``."""
        return torch.einsum("pnd,pd->pn", X, self.w) + self.b[:, None]


def _check_xy(X: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if X.dim() != 3 or y.dim() != 1 or X.shape[1] != y.shape[0]:
        raise ProbeError(f"{what}: need X [P, N, D] and y [N], got {tuple(X.shape)} and {tuple(y.shape)}")
    n1 = int(y.sum())
    if n1 == 0 or n1 == y.numel():
        raise ProbeError(f"{what}: labels hold a single class ({y.numel()} examples, all {int(y[0])}); "
                         f"a probe needs both")
    if y.numel() < 4:
        raise ProbeError(f"{what}: {y.numel()} examples are too few to train a probe (need at least 4)")


def standardise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-problem feature means and standard deviations ``[P, 1, D]`` (population std, floor 1e-6)."""
    return X.mean(1, keepdim=True), X.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)


def _to_activation_coords(w: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> LinearProbes:
    """Weights on standardised features ``(x - mu) / sd`` -> weights on ``x``."""
    w_x = w / sd[:, 0]
    return LinearProbes(w_x, b - (w_x * mu[:, 0]).sum(-1))


def _logistic_loss(Z: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean log-loss + l2/2 |w|^2 (intercept, the last coefficient, unpenalised), for ``beta [P, D+1, K]``
    candidates: returns ``[P, K]``."""
    z = Z @ beta  # [P, N, K]
    ll = (torch.nn.functional.softplus(z) - y[None, :, None] * z).mean(1)
    return ll + 0.5 * l2 * (beta[:, :-1] ** 2).sum(1)


def spd_solve(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``H^-1 g`` for a batch of symmetric positive definite ``H [P, D, D]`` and ``g [P, D]``, by
    Cholesky. (Batched LU, ``torch.linalg.solve``, fails on CPU with several MKL threads from about 64
    problems of 257 unknowns on: "Pivots given to lu_solve must all be greater or equal to 1", which
    stopped every head probe of a model with 256-wide heads such as Gemma-3-270M.) A problem whose
    factorisation fails numerically gets a ridge of 1e-6 of its mean diagonal, in float64."""
    L, info = torch.linalg.cholesky_ex(H)
    bad = info > 0
    if bool(bad.any()):
        Hb = H[bad].double()
        eye = torch.eye(H.shape[-1], dtype=Hb.dtype, device=Hb.device)
        ridge = 1e-6 * Hb.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
        L = L.clone()
        L[bad] = torch.linalg.cholesky(Hb + ridge * eye).to(H.dtype)
    return torch.cholesky_solve(g[..., None], L)[..., 0]


@torch.no_grad()
def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, iters: int = 50, tol: float = 1e-7) -> LinearProbes:
    """L2-regularised logistic regression for every problem ``p`` of ``X [P, N, D]`` with labels
    ``y [N]``: minimises ``mean log-loss + l2/2 |w|^2`` on standardised features (sklearn's
    ``LogisticRegression(C=1/(N*l2))`` on the same features) with batched Newton steps and a
    vectorised Armijo backtracking line search. Returns weights in activation coordinates."""
    _check_xy(X, y, "fit_logistic")
    X = X.float()
    y = y.to(X.device, torch.float32)
    P, N, D = X.shape
    mu, sd = standardise(X)
    Z = torch.cat([(X - mu) / sd, X.new_ones(P, N, 1)], -1)  # [P, N, D+1]
    reg = torch.full((D + 1,), l2, device=X.device)
    reg[-1] = 1e-8
    beta = X.new_zeros(P, D + 1)
    steps = 0.5 ** torch.arange(12, device=X.device, dtype=X.dtype)  # [K]
    for _ in range(iters):
        p = torch.sigmoid(Z @ beta[..., None])[..., 0]  # [P, N]
        g = torch.einsum("pnd,pn->pd", Z, p - y) / N + reg * beta
        if g.abs().max() < tol:
            break
        Hs = torch.einsum("pnd,pn,pne->pde", Z, p * (1 - p), Z) / N + torch.diag(reg)
        d = spd_solve(Hs, g)  # [P, D+1]
        cand = beta[..., None] - d[..., None] * steps  # [P, D+1, K]
        loss0 = _logistic_loss(Z, y, beta[..., None], l2)  # [P, 1]
        ok = _logistic_loss(Z, y, cand, l2) <= loss0 - 1e-4 * steps * (g * d).sum(-1, keepdim=True)
        k = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], len(steps) - 1, dtype=torch.long))
        beta = cand[torch.arange(P), :, k]
    return _to_activation_coords(beta[:, :-1], beta[:, -1], mu, sd)


def _smooth_risk(p: torch.Tensor, y: torch.Tensor, b: float) -> torch.Tensor:
    """``sum p (1-y) / N0 + b sum (1-p) y / N1`` over the last axis (SLIM's surrogate of FPR + b FNR)."""
    n1 = y.sum()
    return (p * (1 - y)).sum(-1) / (y.numel() - n1) + b * ((1 - p) * y).sum(-1) / n1


def risk(flag: torch.Tensor, y: torch.Tensor, b: float = 1.0) -> torch.Tensor:
    """``FPR + b * FNR`` of boolean flags ``[..., N]`` against labels ``y [N]`` (1 = undesirable)."""
    return _smooth_risk(flag.float(), y.float(), b)


def fit_risk_probe(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, b: float = 1.0,
                   lr: float = 2e-3, epochs: int = 500) -> tuple[LinearProbes, torch.Tensor, torch.Tensor]:
    """SLIM's risk-aware probe for every problem of ``X [P, N, D]`` at once: the smooth surrogate of
    ``FPR + b * FNR`` minimised by full-batch Adam (``lr``) on standardised features, keeping for each
    problem the epoch with the lowest validation risk (hard ``p > 0.5`` decisions on ``Xv``, ties broken
    by the smooth validation risk). Returns the probes (activation coordinates), the best epoch and
    the validation risk ``[P]``."""
    _check_xy(X, y, "fit_risk_probe")
    _check_xy(Xv, yv, "fit_risk_probe (validation)")
    X, Xv = X.float(), Xv.float()
    y, yv = y.to(X.device, torch.float32), yv.to(X.device, torch.float32)
    P, _, D = X.shape
    mu, sd = standardise(X)
    Z, Zv = (X - mu) / sd, (Xv - mu) / sd
    w = torch.zeros(P, D, device=X.device, requires_grad=True)
    c = torch.zeros(P, device=X.device, requires_grad=True)
    opt = torch.optim.Adam([w, c], lr=lr)
    best = (torch.full((P,), float("inf"), device=X.device), w.detach().clone(), c.detach().clone(),
            torch.zeros(P, dtype=torch.long, device=X.device))
    for epoch in range(epochs + 1):
        with torch.no_grad():
            pv = torch.sigmoid(torch.einsum("pnd,pd->pn", Zv, w) + c[:, None])
            score = risk(pv > 0.5, yv, b) + 1e-3 * _smooth_risk(pv, yv, b)
            better = score < best[0]
            best = (torch.where(better, score, best[0]), torch.where(better[:, None], w, best[1]),
                    torch.where(better, c, best[2]), torch.where(better, epoch, best[3]))
        if epoch == epochs:
            break
        opt.zero_grad()
        p = torch.sigmoid(torch.einsum("pnd,pd->pn", Z, w) + c[:, None])
        _smooth_risk(p, y, b).sum().backward()
        opt.step()
    probes = _to_activation_coords(best[1], best[2], mu, sd)
    return probes, best[3], risk(probes.logits(Xv) > 0, yv, b)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Share of correct ``logit > 0`` decisions, ``[P, N]`` -> ``[P]``."""
    return ((logits > 0).float() == y.float()).float().mean(-1)


def auroc(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve per problem, ``[P, N]`` -> ``[P]``: the share of (positive, negative)
    pairs ranked correctly, ties counting one half."""
    pos, neg = scores[:, y > 0.5], scores[:, y <= 0.5]
    diff = pos[:, :, None] - neg[:, None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean((1, 2))


# --- per head and per layer ------------------------------------------------------------------------
@dataclass
class HeadProbes:
    """Logistic probes at every (layer, head) and every layer's residual stream: validation accuracy
    and AUROC (``[L, H]`` and ``[L]``), the head probes' weights ``w [L, H, d_head]``, ``b [L, H]``."""

    layers: list[int]
    head_acc: torch.Tensor
    head_auc: torch.Tensor
    resid_acc: torch.Tensor | None
    resid_auc: torch.Tensor | None
    w: torch.Tensor
    b: torch.Tensor
    meta: dict = field(default_factory=dict)

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` (layer, head) pairs of highest validation accuracy. Ties (frequent: accuracy on
        a small validation set takes few values) are broken deterministically by the higher
        validation AUROC, then by the earlier layer, then the lower head index."""
        L, H = self.head_acc.shape
        if not 1 <= k <= L * H:
            raise ProbeError(f"k must be between 1 and {L * H} (layers x heads), got {k}")
        acc = self.head_acc.double().cpu().numpy().ravel()
        auc = self.head_auc.double().cpu().numpy().ravel()
        idx = np.lexsort((np.arange(L * H), -auc, -acc))[:k].tolist()  # last key sorts first
        return [(self.layers[i // H], i % H) for i in idx]

    def to_dict(self) -> dict:
        """JSON-ready: per-head and per-layer accuracy and AUROC (4 decimals) and the provenance."""
        r = lambda t: None if t is None else np.round(t.cpu().numpy().astype(float), 4).tolist()  # noqa: E731
        return {"layers": self.layers, "head_accuracy": r(self.head_acc), "head_auroc": r(self.head_auc),
                "resid_accuracy": r(self.resid_acc), "resid_auroc": r(self.resid_auc), **self.meta}


def probe_heads(data: ProbeData, l2: float = 1e-2) -> HeadProbes:
    """Fit and validate a logistic probe per (layer, head) in one batched problem ``[L*H, N, d_head]``,
    and one per layer on the residual stream."""
    tr, va = data.heads["train"], data.heads["validation"]
    L, N, H, dh = tr.shape
    flat = lambda t: t.permute(0, 2, 1, 3).reshape(L * H, t.shape[1], dh)  # noqa: E731
    y, yv = data.labels["train"], data.labels["validation"]
    probes = fit_logistic(flat(tr), y, l2)
    lv = probes.logits(flat(va))
    acc, auc = accuracy(lv, yv).view(L, H), auroc(lv, yv).view(L, H)
    racc = rauc = None
    if data.resid:
        rp = fit_logistic(data.resid["train"], y, l2)
        rl = rp.logits(data.resid["validation"])
        racc, rauc = accuracy(rl, yv), auroc(rl, yv)
    meta = {**data.meta, "l2": l2}
    return HeadProbes(data.layers, acc, auc, racc, rauc, probes.w.view(L, H, dh), probes.b.view(L, H), meta)


@dataclass
class RiskProbes:
    """SLIM stage 1: risk-aware probes per (layer, head) (``w [L, H, d_head]``, ``b [L, H]``), the
    head-vote classifier per layer (flag when at least ``tau[l]`` heads say p > 0.5; ``tau`` chosen
    to minimise validation FPR + b FNR, whose value is ``layer_risk[l]``) and ``layer``, the layer
    with the lowest validation risk (the one to edit; ties: :func:`choose_layer`)."""

    layers: list[int]
    w: torch.Tensor
    b: torch.Tensor
    head_risk: torch.Tensor
    tau: torch.Tensor
    layer_risk: torch.Tensor
    layer: int
    meta: dict = field(default_factory=dict)


def vote_threshold(fires: torch.Tensor, y: torch.Tensor, b: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For head decisions ``fires [L, H, N]`` (bool), the ``tau`` in 0..H-1 (the paper's range; 0: the
    layer gate always opens and each head acts on its own decision) minimising the risk of the rule
    "at least tau heads fire", per layer: returns ``(tau [L], risk [L])``."""
    L, H, _ = fires.shape
    counts = fires.sum(1)  # [L, N]
    taus = torch.arange(0, H, device=fires.device)
    r = risk(counts[:, None, :] >= taus[None, :, None], y, b)  # [L, H]
    best = torch.argmin(r, 1)  # first (smallest) tau on ties
    return taus[best], r.gather(1, best[:, None])[:, 0]


def choose_layer(layer_risk: torch.Tensor, head_risk: torch.Tensor) -> int:
    """Index of the layer to edit: the lowest validation vote risk ``layer_risk [L]``; layers tied at
    it (on a small validation set several often are) are told apart by the lowest mean validation
    risk of their single-head probes ``head_risk [L, H]``, then by depth (the first)."""
    tied = torch.nonzero(layer_risk <= layer_risk.min() + 1e-9).flatten()
    return int(tied[torch.argmin(head_risk[tied].mean(1))])


def risk_probes(data: ProbeData, b: float = 1.0, lr: float = 2e-3, epochs: int = 500) -> RiskProbes:
    """SLIM stage 1 on captured head activations: risk probes for every head of every layer in one
    batched run, the vote threshold per layer and the layer to edit."""
    tr, va = data.heads["train"], data.heads["validation"]
    L, N, H, dh = tr.shape
    flat = lambda t: t.permute(0, 2, 1, 3).reshape(L * H, t.shape[1], dh)  # noqa: E731
    yv = data.labels["validation"]
    probes, epoch, head_risk = fit_risk_probe(flat(tr), data.labels["train"], flat(va), yv, b, lr, epochs)
    fires = (probes.logits(flat(va)) > 0).view(L, H, -1)
    tau, layer_risk = vote_threshold(fires, yv, b)
    best = choose_layer(layer_risk, head_risk.view(L, H))
    meta = {**data.meta, "b": b, "lr": lr, "epochs": epochs, "best_epoch": epoch.view(L, H).tolist(),
            "layer_choice": "lowest validation vote risk; ties: lowest mean head risk, then the first"}
    return RiskProbes(data.layers, probes.w.view(L, H, dh), probes.b.view(L, H), head_risk.view(L, H), tau,
                      layer_risk, data.layers[best], meta)


def heatmap(result: HeadProbes, path: str | Path, title: str | None = None) -> Path:
    """Validation accuracy of the head probes (layers x heads), next to the residual-stream probe's
    accuracy per layer; saved as PNG."""
    from ..report.figures import figure, label, save

    acc = result.head_acc.cpu().numpy()
    fig, axes = figure(1, 2, title=title or f"probe accuracy ({result.meta.get('model', '')})",
                       width=11, height=max(4.0, 0.22 * len(result.layers) + 1.5))
    im = axes[0].imshow(acc, aspect="auto", cmap="viridis", origin="lower", vmin=0.5, vmax=max(0.51, acc.max()))
    axes[0].set_yticks(range(len(result.layers)), [str(i) for i in result.layers], fontsize=7)
    fig.colorbar(im, ax=axes[0], label="validation accuracy")
    label(axes[0], "head", "layer", "attention heads (last token)", legend=False)
    if result.resid_acc is not None:
        axes[1].plot(result.resid_acc.cpu().numpy(), result.layers, marker="o", label="residual stream")
    axes[1].plot(acc.max(1), result.layers, marker=".", linestyle="--", label="best head")
    label(axes[1], "validation accuracy", "layer", "per layer")
    return save(fig, path)
