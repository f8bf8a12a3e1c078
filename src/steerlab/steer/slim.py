"""SLIM (METHODS.md section 5): probe-gated Gaussian optimal transport of attention heads into
the region their risk-aware probes call safe.

Stage 1 (:func:`steerlab.explain.probes.risk_probes`): a risk-aware logistic probe per (layer, head)
(the smooth surrogate of FPR + b FNR, full-batch Adam, best validation epoch), a layer classifier
"at least tau heads fire" with ``tau`` chosen on validation, and the layer with the lowest
validation risk.

Stage 2 (:func:`gaussian_ot_map`), per head of that layer: ``mu_hat``, ``Sigma_hat`` of the training
activations the head's probe flags (``Sigma_hat`` shrunk towards a scaled identity so that it is
invertible when there are fewer samples than dimensions), then the chance-constrained program

    min |mu - mu_hat|^2 + |S - Sigma_hat^(1/2)|_F^2
    s.t. theta0 + theta^T mu + Phi^-1(1 - gamma) t <= 0,  |S theta| <= t,  S PSD

(``|S theta| <= t`` is the second-order-cone form of the LMI [[t I, S theta], [theta^T S, t]] PSD:
the same set by the Schur complement), solved exactly by a one-dimensional reduction
(:func:`program_closed_form`; the conic program through cvxpy + Clarabel, :func:`program_cvxpy`, is
the reference and ``solver="cvxpy"`` selects it): a Gaussian
``N(mu, S^2)`` then lies on the safe side of the probe with probability at least ``1 - gamma``.
With ``Sigma* = S*^2``: ``A = Sigma_hat^(-1/2) (Sigma_hat^(1/2) Sigma* Sigma_hat^(1/2))^(1/2)
Sigma_hat^(-1/2)`` and ``b = mu* - A mu_hat``, the optimal-transport map ``a -> A a + b`` from
``N(mu_hat, Sigma_hat)`` to ``N(mu*, Sigma*)``. A head whose program fails is left unedited (its name
and the reason are recorded and warned about); the others are kept.

Stage 3 (:meth:`SLIM.apply`): at the chosen layer, at the last position of every forward call,
``p_h = sigmoid(theta0_h + theta_h . a_h)``; when at least ``tau`` heads have ``p_h > 0.5``, each
firing head moves ``a_h <- a_h + kappa p_h (A_h a_h + b_h - a_h)``. ``SLIM.fired`` / ``SLIM.calls``
count the rows (batch rows x forward calls) where the layer classifier fired.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SteerlabError
from ..explain.probes import Labelled, ProbeData, probe_data, risk_probes
from ..hooks import EditFn, edit
from ..interventions import Intervention, InterventionError, groups_by, provenance, register
from ..models.model import Model
from ..options import option
from ..registry import choose
from .iti import LabelledDataOptions, check_head_sites, heads_site

LAYER_CHOICES = ("effect", "risk")


class SLIMError(InterventionError):
    """A SLIM intervention that cannot be fitted (solver failure, too few samples) or does not fit the model."""


def sqrtm_psd(S: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Symmetric square root (or inverse square root) of a positive semi-definite matrix."""
    vals, vecs = np.linalg.eigh((S + S.T) / 2)
    vals = np.clip(vals, 0, None)
    if inverse:
        if vals.min() <= 1e-12 * max(vals.max(), 1e-300):
            raise SLIMError("covariance is singular: cannot take its inverse square root")
        vals = 1 / vals
    return (vecs * np.sqrt(vals)) @ vecs.T


def head_gaussian(X: np.ndarray, shrink: float = 0.1, what: str = "head") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``X [n, d]``, the covariance shrunk by ``shrink`` towards
    ``trace / d * I``; fewer than 2 samples is an error naming ``what``."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise SLIMError(f"{what}: {0 if X.ndim != 2 else len(X)} flagged activations are too few for a "
                        f"covariance (need at least 2)")
    if not np.isfinite(X).all():
        raise SLIMError(f"{what}: the flagged activations contain NaN or inf")
    mu = X.mean(0)
    C = np.cov(X, rowvar=False).reshape(X.shape[1], X.shape[1])
    d = C.shape[0]
    C = (1 - shrink) * C + shrink * max(np.trace(C) / d, 1e-8) * np.eye(d)
    return mu, C


def ot_map(mu_hat: np.ndarray, R: np.ndarray, mu_star: np.ndarray, S_star: np.ndarray) -> dict[str, np.ndarray]:
    """The Gaussian optimal-transport map ``a -> A a + b`` from ``N(mu_hat, R^2)`` to ``N(mu*, S*^2)``."""
    S_star = (S_star + S_star.T) / 2
    sigma_star = S_star @ S_star
    R_inv = sqrtm_psd(R @ R, inverse=True)
    A = R_inv @ sqrtm_psd(R @ sigma_star @ R) @ R_inv
    return {"A": A, "b": mu_star - A @ mu_hat, "mu": mu_star, "sigma": sigma_star}


def program_closed_form(mu_hat: np.ndarray, R: np.ndarray, theta0: float, theta: np.ndarray, z: float,
                        what: str = "head") -> tuple[np.ndarray, np.ndarray]:
    """The optimum ``(mu*, S*)`` of the program of the module docstring (``R = Sigma_hat^(1/2)``,
    ``z = Phi^-1(1 - gamma) > 0``) without a conic solver.

    With ``u = theta / |theta|``, ``c = theta0 / |theta|`` the constraint is ``c + u.mu + z |S u| <= 0``
    (``t = |S u|`` at the optimum). In an orthonormal basis ``[u, U]`` write ``S = [[a, b'], [b, C]]``:
    ``|S - R|_F^2 = (a - r_a)^2 + 2 |b - r_b|^2 + |C - R_C|_F^2`` and ``|S u|^2 = a^2 + |b|^2``, so
    ``C = R_C``, ``b`` stays parallel to ``r_b`` and ``mu`` moves along ``u`` only. Stationarity with
    the ball multiplier ``lam`` gives ``a = r_a / (1 + lam)``, ``|b| = rho / (1 + lam / 2)``
    (``rho = |r_b|``) and ``u.mu = u.mu_hat - s lam / z`` with ``s = |S u|``; ``lam`` is the root of
    ``c + u.mu_hat + s(lam) (z - lam / z) = 0`` (one-dimensional, bracketed, Brent). When
    ``c + u.mu_hat >= sqrt(r_a^2 + 4 rho^2) / z`` the optimum is ``S u = 0`` and ``u.mu = -c``. The
    PSD constraint is inactive: ``a / (1 + lam) >= b' R_C^-1 b / (1 + lam/2)^2`` follows from ``R``
    being PSD. ``tests/test_slim.py`` checks the result against the conic program (cvxpy)."""
    from scipy.optimize import brentq

    nt = float(np.linalg.norm(theta))
    if not (np.isfinite(nt) and np.isfinite(theta0) and np.isfinite(mu_hat).all() and np.isfinite(R).all()):
        raise SLIMError(f"{what}: the program has non-finite inputs (probe or activations contain NaN/inf)")
    if nt < 1e-12:
        if theta0 <= 0:
            return mu_hat.copy(), R.copy()
        raise SLIMError(f"{what}: the program is infeasible (the probe has zero weights and says unsafe everywhere)")
    u, c = theta / nt, theta0 / nt
    Ru = R @ u
    m_hat, ra = float(u @ mu_hat), float(u @ Ru)
    w = Ru - ra * u
    rho = float(np.linalg.norm(w))
    if c + m_hat + z * float(np.linalg.norm(Ru)) <= 0:
        return mu_hat.copy(), R.copy()  # already safe with probability >= 1 - gamma

    def s_of(lam: float) -> float:
        return float(np.hypot(ra / (1 + lam), rho / (1 + lam / 2)))

    if c + m_hat >= np.hypot(ra, 2 * rho) / z:
        a, beta, m = 0.0, 0.0, -c
    else:
        g = lambda lam: c + m_hat + s_of(lam) * (z - lam / z)  # noqa: E731
        hi = max(1.0, z * z)
        while g(hi) > 0:
            hi *= 4
        lam = brentq(g, 0.0, hi, xtol=1e-14, rtol=1e-14, maxiter=500)
        a, beta, m = ra / (1 + lam), rho / (1 + lam / 2), m_hat - s_of(lam) * lam / z
    S = R + (a - ra) * np.outer(u, u)
    if rho > 1e-300:
        S = S + (beta / rho - 1) * (np.outer(w, u) + np.outer(u, w))
    return mu_hat + (m - m_hat) * u, S


def program_cvxpy(mu_hat: np.ndarray, R: np.ndarray, theta0: float, theta: np.ndarray, z: float,
                  what: str = "head") -> tuple[np.ndarray, np.ndarray]:
    """The same optimum from the conic program (cvxpy + Clarabel): the reference for
    :func:`program_closed_form` (seconds per 64-dimensional head instead of microseconds)."""
    import cvxpy as cp

    d = len(mu_hat)
    mu, S, t = cp.Variable(d), cp.Variable((d, d), PSD=True), cp.Variable(nonneg=True)
    cons = [theta0 + theta @ mu + z * t <= 0, cp.SOC(t, S @ theta)]
    prob = cp.Problem(cp.Minimize(cp.sum_squares(mu - mu_hat) + cp.sum_squares(S - R)), cons)
    try:
        prob.solve(solver=cp.CLARABEL)
    except Exception as e:  # cvxpy.SolverError and numerical failures inside the solver
        raise SLIMError(f"{what}: the conic solver failed ({type(e).__name__}: {e})") from None
    if prob.status not in ("optimal", "optimal_inaccurate") or mu.value is None:
        raise SLIMError(f"{what}: the conic solver ended with status {prob.status!r}")
    return mu.value, S.value


SOLVERS = {"closed": program_closed_form, "cvxpy": program_cvxpy}


def gaussian_ot_map(mu_hat: np.ndarray, sigma_hat: np.ndarray, theta0: float, theta: np.ndarray,
                    gamma: float = 0.1, what: str = "head", solver: str = "closed") -> dict[str, np.ndarray]:
    """Solve the chance-constrained program (module docstring) with ``solver`` (``closed``: the exact
    one-dimensional reduction, default; ``cvxpy``: the conic program) and return ``A``, ``b``, ``mu``
    (``mu*``) and ``sigma`` (``Sigma*``) as float64 arrays; raises :class:`SLIMError` naming ``what``
    when the program cannot be solved."""
    from scipy.stats import norm

    if not 0 < gamma < 0.5:
        raise SLIMError(f"gamma must be in (0, 0.5), got {gamma}")
    choose("SLIM solver", solver, SOLVERS, SLIMError)
    R = sqrtm_psd(sigma_hat)
    mu_star, S_star = SOLVERS[solver](np.asarray(mu_hat, dtype=np.float64), R, float(theta0),
                                      np.asarray(theta, dtype=np.float64), float(norm.ppf(1 - gamma)), what)
    return ot_map(mu_hat, R, mu_star, S_star)


def fit_head_maps(acts: np.ndarray, flags: np.ndarray, w: np.ndarray, b0: np.ndarray, layer: int,
                  gamma: float, shrink: float, solver: str = "closed") -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Per head of one layer (``acts [N, H, d]``, probe flags ``[N, H]``): the map ``A [H, d, d]``,
    ``b [H, d]`` (identity and zero where it failed) and ``{head: why}`` for the failures."""
    N, H, d = acts.shape
    A, b = np.tile(np.eye(d), (H, 1, 1)), np.zeros((H, d))
    failed: dict[int, str] = {}
    for h in range(H):  # one convex program per head
        what = f"layer {layer} head {h}"
        try:
            mu_hat, sig_hat = head_gaussian(acts[flags[:, h], h], shrink, what)
            m = gaussian_ot_map(mu_hat, sig_hat, float(b0[h]), w[h], gamma, what, solver)
        except SteerlabError as e:
            failed[h] = str(e)
            warnings.warn(f"SLIM: {e}; this head is left unedited", stacklevel=2)
            continue
        A[h], b[h] = m["A"], m["b"]
    if len(failed) == H:
        raise SLIMError(f"SLIM could not fit any head of layer {layer}: " + "; ".join(failed.values()))
    return A, b, failed


def vote(a: torch.Tensor, w: torch.Tensor, b0: torch.Tensor, tau: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stage-3 classifier on head activations ``a [..., H, d]``: each head's probability ``p``,
    its decision ``p > 0.5`` and the layer's "at least ``tau`` heads fire" ``[...]``."""
    prob = torch.sigmoid(torch.einsum("...hd,hd->...h", a, w) + b0)
    fire = prob > 0.5
    return prob, fire, fire.sum(-1) >= tau


def edit_shift(a: torch.Tensor, w, b0, tau: int, A, b, active, kappa: float = 1.0) -> torch.Tensor:
    """The stage-3 rule applied to captured head activations ``a [N, H, d]`` (no forward pass): per
    row, the norm of the change over the norm of the activations, ``[N]``."""
    prob, fire, gate = vote(a, w, b0, tau)
    move = (fire & gate[..., None] & active).to(a.dtype) * prob
    new = a + kappa * move[..., None] * (torch.einsum("hde,nhe->nhd", A, a) + b - a)
    return (new - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-12)


def risk_se(fires: torch.Tensor, y: torch.Tensor, b: float = 1.0) -> torch.Tensor:
    """Binomial standard error of ``FPR + b FNR`` for layer decisions ``fires [L, N]``: ``[L]``. Each
    rate enters with the Agresti-Coull adjustment, ``(errors + 2) / (n + 4)`` over ``n + 4``, so a
    layer without a validation error still has an uncertainty (the plain formula gives 0 there,
    and the one-standard-error rule would then keep only error-free layers)."""
    y = y.bool()
    n_neg, n_pos = int((~y).sum()), int(y.sum())
    fpr = (fires[:, ~y].float().sum(1) + 2) / (n_neg + 4)
    fnr = ((~fires[:, y]).float().sum(1) + 2) / (n_pos + 4)
    return (fpr * (1 - fpr) / (n_neg + 4) + b * b * fnr * (1 - fnr) / (n_pos + 4)).sqrt()


def choose_layer_by_effect(pd: ProbeData, rp, b: float, maps) -> tuple[int, dict]:
    """SLIM's layer among those whose validation vote risk lies within one standard error of the
    lowest (on a small validation set several usually do): the one whose edit (kappa 1, on the
    validation activations) moves toxic rows most beyond how much it moves non-toxic rows (the false
    detections whose semantic shift the paper's stage 3 keeps small). ``maps(layer)`` gives
    ``(A, b, active)`` torch tensors. Returns the layer and, per candidate, its risk and shifts."""
    va, yv = pd.heads["validation"], pd.labels["validation"]
    gates = torch.stack([vote(va[i], rp.w[i], rp.b[i], int(rp.tau[i]))[2] for i in range(len(pd.layers))])
    best = int(torch.argmin(rp.layer_risk))
    bound = float(rp.layer_risk[best] + risk_se(gates, yv, b)[best]) + 1e-9
    info = {}
    for i in torch.nonzero(rp.layer_risk <= bound).flatten().tolist():
        A, bb, active = maps(pd.layers[i])
        shift = edit_shift(va[i], rp.w[i], rp.b[i], int(rp.tau[i]), A.to(va), bb.to(va), active.to(va.device))
        tox, non = float(shift[yv > 0.5].mean()), float(shift[yv < 0.5].mean())
        info[pd.layers[i]] = {"risk": round(float(rp.layer_risk[i]), 4), "toxic_shift": round(tox, 4),
                              "nontoxic_shift": round(non, 4), "margin": round(tox - non, 4)}
    layer = max(info, key=lambda k: (info[k]["margin"], -k))
    return layer, {"rule": "within 1 SE of the lowest validation risk; the largest toxic-minus-non-toxic shift "
                   "of the validation head activations at kappa 1", "risk_bound": round(bound, 4), "candidates": info}


class SLIMEdit(EditFn):
    """The stage-3 edit of one layer's heads ``[B, T, H, d]``: at the last position of each call
    (``where="last"``, the method), or at every position a schedule selects (``"all"``: what a
    teacher-forced pass sees when each token is edited as it is during generation)."""

    def __init__(self, iv: SLIM, kappa, where: str = "last"):
        super().__init__(where)
        self.iv, self.kappa = iv, kappa

    def bind(self, site, feat_shape, device, dtype):
        t = self.iv.params
        self._p = {k: t[k].to(device=device, dtype=dtype) for k in ("w", "b0", "A", "b")}
        self._active = t["active"].to(device=device)
        self._kappa = torch.as_tensor(self.kappa, device=device, dtype=dtype)

    def move(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a [B, T, H, d]`` -> the edited activations and the layer gate ``[B, T]``."""
        P = self._p
        prob, fire, gate = vote(a, P["w"], P["b0"], self.iv.tau)
        move = (fire & gate[..., None] & self._active).to(a.dtype) * prob
        k = self._kappa.view(-1, 1, 1) if self._kappa.dim() == 1 else self._kappa
        target = torch.einsum("hde,bthe->bthd", P["A"], a) + P["b"]
        return a + (k * move)[..., None] * (target - a), gate

    def __call__(self, act: torch.Tensor, step) -> torch.Tensor:
        if self.where == "last":
            new, gate = self.move(act[:, -1:])
            self.iv.fired = self.iv.fired + gate.sum()
            self.iv.calls = self.iv.calls + gate.numel()
            return torch.cat([act[:, :-1], new], 1)
        new, gate = self.move(act)
        m = step.where(self.where, act.device)
        m = torch.ones_like(gate) if m is None else m.expand_as(gate)
        self.iv.fired = self.iv.fired + (gate & m).sum()
        self.iv.calls = self.iv.calls + m.sum()
        return torch.where(m[..., None, None], new, act)


@dataclass
class SLIMFitOptions(LabelledDataOptions):
    gamma: float = option(0.1, "chance-constraint level: the target is safe with probability >= 1 - gamma",
                          low=0.0, high=0.5)
    layer: int = option(None, "layer to edit (default: the lowest validation risk)", type=int)
    epochs: int = option(500, "Adam epochs of the risk-aware probes", low=1)
    shrink: float = option(0.1, "covariance shrinkage towards a scaled identity", low=0.0, high=1.0)
    layer_choice: str = option("effect", "effect: among layers within 1 SE of the lowest validation risk, the one "
                               "whose edit moves toxic validation heads most beyond non-toxic ones; risk: the lowest "
                               "risk (ties: mean head risk, then depth)", choices=("effect", "risk"))
    solver: str = option("closed", "transport program solver: closed (exact closed form, ms per head) or cvxpy "
                         "(the conic program with Clarabel, seconds per head)", choices=SOLVERS)


@dataclass
class SLIMApplyOptions:
    kappa: float = option(1.0, "multiple of the transport step: 1 moves a fully flagged head exactly onto its "
                          "transported value (the paper swept 20-60)", aliases=("alpha",), unit="x transport step")
    where: str = option("last", "last: the last position of every call; all: every position (a teacher-forced "
                        "pass then sees what generation does)", choices=("last", "all"))


@register
@dataclass
class SLIM(Intervention):
    """SLIM: probe-gated Gaussian optimal transport of one layer's heads into the probe-safe region."""

    params: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    method = "slim"
    FitOptions = SLIMFitOptions
    ApplyOptions = SLIMApplyOptions
    strength_option = "kappa"

    def __post_init__(self):
        need = {"w", "b0", "A", "b", "active"}
        if need - set(self.params):
            raise SLIMError(f"a SLIM intervention needs tensors {sorted(need)}, missing {sorted(need - set(self.params))}")
        self.params = {k: torch.as_tensor(v).detach().cpu() for k, v in self.params.items()}
        self.params["active"] = self.params["active"].bool()
        self.meta = {**self.meta, "sites": [heads_site(self.layer)]}
        self.reset_counts()

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    @property
    def tau(self) -> int:
        return int(self.meta["tau"])

    def reset_counts(self) -> None:
        self.fired: torch.Tensor | int = 0
        self.calls: torch.Tensor | int = 0

    @property
    def fire_rate(self) -> float:
        """Share of (batch row, forward call) steps in which the layer classifier fired."""
        return float(self.fired) / float(self.calls) if float(self.calls) else 0.0

    @classmethod
    def fit(cls, model: Model, data: Labelled | ProbeData, gamma: float = 0.1, b: float = 1.0, lr: float = 2e-3,
            epochs: int = 500, shrink: float = 0.1, layer: int | None = None, layers=None, batch_size: int = 16,
            chat: bool = False, solver: str = "closed", layer_choice: str = "effect") -> SLIM:
        """Stages 1 and 2 on ``data`` (labelled texts, or activations from :func:`probe_data`); ``layer``
        overrides the chosen layer. ``layer_choice``: ``effect`` (:func:`choose_layer_by_effect`) or
        ``risk`` (the lowest validation risk; ties: :func:`~steerlab.explain.probes.choose_layer`)."""
        choose("SLIM solver", solver, SOLVERS, SLIMError)
        choose("SLIM layer choice", layer_choice, LAYER_CHOICES, SLIMError)
        pd = data if isinstance(data, ProbeData) else probe_data(model, data, layers, resid=False,
                                                                 batch_size=batch_size, chat=chat)
        pd.check(model)
        rp = risk_probes(pd, b, lr, epochs)
        cache: dict[int, tuple] = {}

        def maps(lay: int) -> tuple:
            if lay not in cache:
                li = pd.layers.index(lay)
                acts, w, b0 = pd.heads["train"][li], rp.w[li], rp.b[li]
                flags = (torch.einsum("nhd,hd->nh", acts, w) + b0) > 0
                A, bb, failed = fit_head_maps(acts.double().cpu().numpy(), flags.cpu().numpy(),
                                              w.double().cpu().numpy(), b0.double().cpu().numpy(), lay, gamma,
                                              shrink, solver)
                active = torch.ones(model.n_heads, dtype=torch.bool)
                active[list(failed)] = False
                cache[lay] = (torch.from_numpy(A).float(), torch.from_numpy(bb).float(), active, failed, flags)
            return cache[lay][:3]

        chosen = None
        if layer is not None:
            layer = model.site(heads_site(layer)).layer
            if layer not in pd.layers:
                raise SLIMError(f"layer {layer} was not probed (probed layers: {pd.layers})")
        elif layer_choice == "effect":
            layer, chosen = choose_layer_by_effect(pd, rp, b, maps)
        else:
            layer = rp.layer
        li = pd.layers.index(layer)
        maps(layer)
        A, bb, active, failed, flags = cache[layer]
        params = {"w": rp.w[li].cpu(), "b0": rp.b[li].cpu(), "A": A, "b": bb, "active": active}
        meta = provenance(model, pd.meta.get("data_fingerprint"),
                          {"gamma": gamma, "b": b, "shrink": shrink, "layer": layer, "solver": solver,
                           "layer_choice": layer_choice},
                          data_text_ids=pd.meta.get("data_text_ids"),
                          model_type=model.config.model_type, source=pd.meta.get("source"),
                          counts=pd.meta.get("counts"), layer=layer, tau=int(rp.tau[li]),
                          layer_risk=[round(float(r), 4) for r in rp.layer_risk], failed_heads=failed,
                          flagged=flags.sum(0).tolist(), **({"layer_selection": chosen} if chosen else {}))
        return cls(params, meta)

    def check(self, model: Model, strict: bool = True) -> None:
        check_head_sites(self.method, {heads_site(self.layer): self.params["b"]}, model, self.meta)
        super().check(model, strict)

    def firing(self, model: Model, texts, batch_size: int = 16) -> torch.Tensor:
        """Whether the layer classifier fires at the last token of each text ``[N]`` (bool), read from
        the unedited activations (the edit of this layer does not change what its probes see)."""
        from ..hooks import capture

        site = heads_site(self.layer)
        a = capture(model, list(texts), site, "last", batch_size=batch_size)[site]
        p = self.params
        return vote(a, p["w"].to(a), p["b0"].to(a), self.tau)[2].cpu()

    def fixed_text_options(self, options: dict) -> dict:
        """Every position: one teacher-forced pass then equals generating the text token by token with
        the last-position edit (tested); at the last position only, a pass over fixed text would show
        almost no side effect by construction."""
        return {**options, "where": "all"}

    @classmethod
    def from_options(cls, model: Model, o: SLIMFitOptions) -> SLIM:
        """``steerlab fit slim``: risk probes on labelled prompts, the head vote, the transport maps."""
        return cls.fit(model, o.labelled(), gamma=o.gamma, layer=o.layer, epochs=o.epochs, shrink=o.shrink,
                       layers=o.layers, solver=o.solver, layer_choice=o.layer_choice)

    def fit_summary(self) -> list[str]:
        failed = self.meta["failed_heads"]
        return [f"layer {self.layer}, tau {self.tau}, validation risk {min(self.meta['layer_risk']):.3f}"
                + (f"; heads left unedited: {sorted(failed)}" if failed else "")]

    @contextmanager
    def apply(self, model: Model, *, kappa, where, strict: bool = True):
        """Run the probe-gated transport at the chosen layer, last position of every call. ``kappa``
        (alias ``alpha``, for ``generate --alpha``; a scalar or ``[batch]``) scales the step:
        1 moves a head with p = 1 exactly onto its transported value (the paper swept 20-60).
        ``where="all"`` edits every position of a pass (a teacher-forced pass then sees what generation
        does token by token; used to measure side effects on fixed text)."""
        self.check(model, strict)
        fn = SLIMEdit(self, kappa, where)
        with edit(model, {heads_site(self.layer): fn}) as step:
            yield step

    def grid_groups(self, settings) -> list[list[int]]:
        """Settings with the same schedule (where) share a batch, one kappa per row."""
        return groups_by([self.apply_options(dict(s)) for s in settings], lambda o: o["where"])

    def apply_rows(self, model: Model, settings, row_setting, strict: bool = True):
        """Settings that differ in ``kappa`` only: the edit with one kappa per row."""
        if len({o["where"] for o in settings}) > 1:
            raise SLIMError("SLIM settings with different schedules (where) are generated apart")
        kappa = torch.tensor([settings[j]["kappa"] for j in row_setting.tolist()], dtype=torch.float64)
        return self.apply(model, kappa=kappa, where=settings[0]["where"], strict=strict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: (v.to(torch.uint8) if k == "active" else v) for k, v in self.params.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> SLIM:
        return cls(dict(tensors), meta)


def semantic_shift(model: Model, iv: SLIM, prompts, cfg=None, **apply_options) -> dict:
    """Continuations of ``prompts`` with and without ``iv`` (common random numbers: the same seeds),
    their semantic similarity (bundled MiniLM sentence model) and the share of steps where SLIM
    fired. On prompts with nothing to correct (neutral text) every firing is a false detection, and
    the similarity measures what it costs."""
    from ..generation import GenConfig, generate
    from ..metrics.text import semantic_similarity

    cfg = cfg or GenConfig(max_new_tokens=20)
    base = [c for row in generate(model, prompts, cfg, progress=False) for c in row]
    iv.reset_counts()
    with iv.apply(model, **apply_options):
        edited = [c for row in generate(model, prompts, cfg, progress=False) for c in row]
    sim = semantic_similarity(base, edited)
    return {"similarity": sim.mean, "identical": float(np.mean([a == b for a, b in zip(base, edited)])),
            "fire_rate": iv.fire_rate, "n": len(base), "per_pair": sim.per_pair.tolist()}
