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


def logit_shift(diffs: np.ndarray | torch.Tensor, W_U: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean logit shift per transition, ``s_r = mean_i U D_{i,r}`` (Table 2 of the paper).

    ``diffs`` is ``[N, T, d]`` (difference vectors of ``N`` samples over ``T`` transitions),
    ``W_U`` the unembedding ``[V, d]``; returns ``[T, V]`` (float64) over the model's vocabulary.
    By linearity this is ``U (mean_i D_{i,r})``."""
    D = torch.as_tensor(diffs, dtype=torch.float64)
    U = torch.as_tensor(W_U).detach().to(dtype=torch.float64, device="cpu")
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
