"""How hidden-state shifts relate to the vocabulary and to steering directions (the analysis maths
of the intrinsic self-correction study, arXiv 2505.11924, METHODS.md section 1; usable on any
set of difference vectors).

- :func:`moved_as_instructed`: which samples' toxicity moved as instructed across rounds;
- :func:`logit_shift`: the mean logit shift ``U mean_i D_i`` of difference vectors (Table 2);
- :func:`lexicon_relation`: that shift against a token-toxicity lexicon (Table 2);
- :func:`projection_stats`: cosine, projection coefficient lambda and rejection norm of a shift
  on a steering vector;
- :func:`svd_shares`: how much of a set of differences lies in its top singular directions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ShapeError
from ..metrics.stats import resample_indices


def moved_as_instructed(tox: np.ndarray, sign: np.ndarray | float, share: float = 0.75,
                        rel: float = 0.02) -> np.ndarray:
    """Which samples moved in the instructed direction often enough (paper: 3 of 4 transitions).

    ``tox`` is ``[N, R]`` (toxicity per round), ``sign`` is ``-1`` for samples told to detox and
    ``+1`` for samples told to toxify (a scalar or ``[N]``). Transition ``r`` counts when
    ``sign * (t_{r+1} - t_r) > rel * (|t_r| + |t_{r+1}|)``; a sample is kept when at least
    ``ceil(share * (R - 1))`` transitions count. Returns a bool ``[N]``."""
    tox = np.asarray(tox, dtype=np.float64)
    if tox.ndim != 2 or tox.shape[1] < 2:
        raise ShapeError(f"tox must be [N, R] with R >= 2, got shape {tox.shape}")
    sign = np.broadcast_to(np.asarray(sign, dtype=np.float64), (tox.shape[0],))[:, None]
    delta = tox[:, 1:] - tox[:, :-1]
    thr = rel * (np.abs(tox[:, 1:]) + np.abs(tox[:, :-1]))
    moved = (sign * delta) > thr
    need = math.ceil(share * (tox.shape[1] - 1) - 1e-9)
    return moved.sum(1) >= need


def logit_shift(diffs: np.ndarray | torch.Tensor, W_U) -> np.ndarray:
    """Mean logit shift per transition, ``s_r = mean_i U D_{i,r}`` (Table 2 of the paper): the direct
    logit effect of the mean move.

    ``diffs`` is ``[N, T, d]`` (difference vectors of ``N`` samples over ``T`` transitions),
    ``W_U`` a model's ``unembed`` (:class:`steerlab.models.unembed.Unembed`) or the unembedding
    matrix ``[V, d]``; returns ``[T, V]`` (float64) over the model's vocabulary. By linearity this
    is ``U (mean_i D_{i,r})``, computed in float64."""
    D = torch.as_tensor(diffs, dtype=torch.float64)
    U = torch.as_tensor(getattr(W_U, "weight", W_U)).detach().to(dtype=torch.float64, device="cpu")
    if D.ndim != 3 or D.shape[-1] != U.shape[1]:
        raise ShapeError(f"diffs must be [N, T, d] with d = {U.shape[1]}, got {tuple(D.shape)}")
    return (D.mean(0) @ U.T).numpy()


def lexicon_relation(shift: np.ndarray, token_ids: np.ndarray, token_tox: np.ndarray, k: int = 100) -> list[dict]:
    """Relate mean logit shifts to token toxicity (Table 2 of the paper).

    ``shift`` is ``[T, V]`` (from :func:`logit_shift`); ``token_ids``/``token_tox`` a token-toxicity
    lexicon (ids into the vocabulary and scores). The ``k`` most toxic tokens (decreasing score,
    ties by id) and the ``k`` least toxic (increasing score, ties by id) are taken; ``k`` is cut to
    half the lexicon when it is smaller. Per transition ``t`` the row holds

    - ``toxic_weighted = sum_{v in top k} s_t[v] tox_v`` and ``nontoxic_weighted`` (same over the
      bottom ``k``): the paper's quantities;
    - ``toxic_mean_logit`` / ``nontoxic_mean_logit``: the plain mean shift of each token set, and
      ``gap`` = their difference (positive: the shift favours toxic tokens);
    - ``toxic_vs_vocab`` / ``nontoxic_vs_vocab``: each set's mean shift minus the mean shift of the
      whole vocabulary (``vocab_mean_logit``).

    A shift that raises every logit by the same amount changes no probability but moves the
    weighted sums (by ``c * sum tox_v``); ``gap`` and the ``*_vs_vocab`` columns are free of it.
    """
    shift = np.asarray(shift, dtype=np.float64)
    ids = np.asarray(token_ids, dtype=np.int64)
    tox = np.asarray(token_tox, dtype=np.float64)
    if shift.ndim != 2:
        raise ShapeError(f"shift must be [T, V], got shape {shift.shape}")
    if ids.shape != tox.shape or ids.ndim != 1 or len(ids) < 2:
        raise ShapeError("the lexicon needs matching 1-d token_ids and scores with at least 2 tokens")
    if ids.max() >= shift.shape[1] or ids.min() < 0:
        raise ShapeError(f"lexicon token id {ids.max()} is outside the vocabulary of size {shift.shape[1]}")
    k = min(int(k), len(ids) // 2)
    top = np.lexsort((ids, -tox))[:k]
    bottom = np.lexsort((ids, tox))[:k]
    rows = []
    for t in range(shift.shape[0]):
        st, sb = shift[t, ids[top]], shift[t, ids[bottom]]
        rows.append({
            "transition": f"{t + 1}->{t + 2}", "k": k,
            "toxic_weighted": float((st * tox[top]).sum()), "nontoxic_weighted": float((sb * tox[bottom]).sum()),
            "toxic_mean_logit": float(st.mean()), "nontoxic_mean_logit": float(sb.mean()),
            "gap": float(st.mean() - sb.mean()), "vocab_mean_logit": float(shift[t].mean()),
            "toxic_vs_vocab": float(st.mean() - shift[t].mean()),
            "nontoxic_vs_vocab": float(sb.mean() - shift[t].mean()),
        })
    return rows


def projection_stats(shift: np.ndarray | torch.Tensor, s: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How a mean shift ``P`` lines up with a steering vector ``s`` (the paper's lambda analysis):
    ``cos``, ``lambda = <P, s> / <s, s>``, the rejection norm ``||P - lambda s||`` and ``||P||``."""
    P = np.asarray(shift, dtype=np.float64).reshape(-1)
    v = np.asarray(s, dtype=np.float64).reshape(-1)
    if P.shape != v.shape:
        raise ShapeError(f"shift and steering vector differ in size: {P.shape} vs {v.shape}")
    vv = float(v @ v)
    if vv == 0:
        raise ShapeError("the steering vector is zero")
    lam = float(P @ v) / vv
    pn = float(np.linalg.norm(P))
    return {"cos": float(P @ v) / (pn * math.sqrt(vv)) if pn > 0 else 0.0, "lambda": lam,
            "rejection_norm": float(np.linalg.norm(P - lam * v)), "shift_norm": pn}


def svd_shares(diffs: np.ndarray) -> dict[str, float]:
    """Share of the stacked differences' squared norm (``[m, d]``) in the top 1 and top 2 singular
    directions, and ``|cos|`` of the first singular direction with the mean difference."""
    M = np.asarray(diffs, dtype=np.float64)
    S = np.linalg.svd(M, compute_uv=False)
    tot = float((S ** 2).sum())
    if tot == 0:
        return {"rank1_share": float("nan"), "rank2_share": float("nan"), "v1_mean_cos": float("nan")}
    _, _, Vt = np.linalg.svd(M, full_matrices=False)
    mean = M.mean(0)
    mn = np.linalg.norm(mean)
    return {"rank1_share": float(S[0] ** 2 / tot), "rank2_share": float((S[:2] ** 2).sum() / tot),
            "v1_mean_cos": float(abs(Vt[0] @ mean) / mn) if mn > 0 else float("nan")}


def per_sample_cos(diffs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosine of each sample's shift with ``v``: ``diffs`` ``[n, ..., d]`` against ``v`` ``[..., d]``
    (one vector per leading position, e.g. per layer); a zero shift counts 0. Returns ``[n, ...]``."""
    D = np.asarray(diffs, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    if D.shape[1:] != V.shape:
        raise ShapeError(f"per-sample shifts {D.shape} do not match the vectors {V.shape} (want [n, *v.shape])")
    norms = np.linalg.norm(D, axis=-1) * np.linalg.norm(V, axis=-1)
    dots = (D * V).sum(-1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def bootstrap_shift_stats(diffs: np.ndarray, v: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                          chunk: int = 100) -> dict[str, np.ndarray]:
    """Percentile-bootstrap CIs over samples (prompts) of how shifts line up with vectors.

    ``diffs`` ``[n, L, d]`` (one shift per sample and layer), ``v`` ``[L, d]``. Each resample draws
    ``n`` samples with replacement (the same draw for every layer and statistic) and recomputes,
    per layer, ``cos`` (cosine of the mean shift with ``v``), ``mean_sample_cos`` (mean over the
    drawn samples of the per-sample cosine) and ``lambda`` (``<mean shift, v> / <v, v>``).
    Returns ``{stat: [L]}`` point values and ``{stat}_lo`` / ``{stat}_hi`` ``[L]``."""
    D = np.asarray(diffs, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    if D.ndim != 3 or D.shape[1:] != V.shape or len(D) == 0:
        raise ShapeError(f"diffs must be [n >= 1, L, d] matching v [L, d], got {D.shape} and {V.shape}")
    if n_boot < 1 or not 0 < ci < 1:
        raise ShapeError(f"n_boot must be >= 1 and ci in (0, 1), got {n_boot}, {ci}")
    n, L, d = D.shape
    vn = np.linalg.norm(V, axis=-1)
    if (vn == 0).any():
        raise ShapeError("a steering vector is zero")
    psc = per_sample_cos(D, V)                           # [n, L]
    proj = (D * V).sum(-1)                                # [n, L]  <D_i, v>
    out = {k: np.empty((n_boot, L)) for k in ("cos", "mean_sample_cos", "lambda")}
    flat = D.reshape(n, L * d)
    for start, idx in resample_indices(n, n_boot, seed, chunk=chunk):
        b = len(idx)
        W = np.zeros((b, n))
        np.add.at(W, (np.arange(b)[:, None], idx), 1.0 / n)
        M = (W @ flat).reshape(b, L, d)                   # resampled mean shifts
        mp = W @ proj                                     # <mean shift, v>
        mn = np.linalg.norm(M, axis=-1)
        out["cos"][start:start + b] = np.where(mn > 0, mp / np.where(mn > 0, mn, 1) / vn, 0.0)
        out["mean_sample_cos"][start:start + b] = W @ psc
        out["lambda"][start:start + b] = mp / vn ** 2
    mean = D.mean(0)
    mnorm = np.linalg.norm(mean, axis=-1)
    point = {"cos": np.where(mnorm > 0, proj.mean(0) / np.where(mnorm > 0, mnorm, 1) / vn, 0.0),
             "mean_sample_cos": psc.mean(0), "lambda": proj.mean(0) / vn ** 2}
    a = (1 - ci) / 2
    res: dict[str, np.ndarray] = {}
    for k, vals in out.items():
        lo, hi = np.quantile(vals, [a, 1 - a], axis=0)
        res[k], res[f"{k}_lo"], res[f"{k}_hi"] = point[k], lo, hi
    return res


def shuffled_directions(acts: np.ndarray, n_desirable: int, n_null: int, seed: int = 0) -> np.ndarray:
    """Label-shuffled null of unit mean-difference steering vectors.

    ``acts`` ``[m, L, d]`` are the contrast set's activations (the first ``n_desirable`` rows
    desirable, the rest undesirable). Each null draw permutes the ``m`` rows at random, calls the
    first ``n_desirable`` desirable, and takes ``unit(mean(desirable) - mean(undesirable))`` per
    layer: the same texts, so the same anisotropy of the activations, with the labels carrying no
    information. Returns ``[n_null, L, d]``."""
    A = np.asarray(acts, dtype=np.float64)
    m = A.shape[0]
    if A.ndim != 3 or not 0 < n_desirable < m:
        raise ShapeError(f"acts must be [m, L, d] with 0 < n_desirable < m, got {A.shape} and {n_desirable}")
    rng = np.random.default_rng(seed)
    out = np.empty((n_null, *A.shape[1:]))
    for j in range(n_null):
        p = rng.permutation(m)
        diff = A[p[:n_desirable]].mean(0) - A[p[n_desirable:]].mean(0)
        out[j] = diff / np.maximum(np.linalg.norm(diff, axis=-1, keepdims=True), 1e-12)
    return out


def max_stat_pvalues(observed: np.ndarray, null: np.ndarray) -> dict:
    """Permutation p-values of a statistic over layers, two-sided (on ``abs``).

    ``observed`` ``[L]``, ``null`` ``[J, L]`` (the statistic under ``J`` null draws). Per layer,
    ``p_layer = (1 + #{j: |null_jl| >= |obs_l|}) / (J + 1)`` (uncorrected). The best layer is the
    one with the largest ``|obs|``; because it was picked among ``L``, its p-value compares
    ``max_l |obs_l|`` with the null distribution of ``max_l |null_jl|`` (max-statistic
    correction, which controls the family-wise error over layers):
    ``p_max = (1 + #{j: max_l |null_jl| >= max_l |obs_l|}) / (J + 1)``."""
    obs = np.abs(np.asarray(observed, dtype=np.float64))
    nul = np.abs(np.asarray(null, dtype=np.float64))
    if nul.ndim != 2 or nul.shape[1] != obs.shape[0] or len(nul) == 0:
        raise ShapeError(f"null must be [J >= 1, L] with L = {obs.shape[0]}, got {nul.shape}")
    J = len(nul)
    p_layer = (1 + (nul >= obs[None, :]).sum(0)) / (J + 1)
    best = int(np.argmax(obs))
    p_max = (1 + int((nul.max(1) >= obs[best]).sum())) / (J + 1)
    return {"p_layer": p_layer, "best_layer": best, "best_abs": float(obs[best]), "p_max": float(p_max),
            "null_max_q95": float(np.quantile(nul.max(1), 0.95))}
