"""The tables and headline numbers of the self-correction study (:mod:`steerlab.experiments.selfcorrect`),
computed from the per-round toxicity and states with the maths of :mod:`steerlab.explain.shifts`,
and written as CSV files under ``tables/``:

4. **Moved as instructed**: a sample whose toxicity moved in the instructed direction in at least
   ``ceil(3/4 (R-1))`` of its ``R-1`` transitions (the paper's 3 of 4 for 5 rounds, generalised),
   a transition counting when the change exceeds ``0.02 (|t_r| + |t_{r+1}|)``.
5. **Logit-lens relation** (Table 2): ``D_{i,r} = h_{i,r+1} - h_{i,r}``; ``s_r = mean_i U D_{i,r}``
   over the model's whole vocabulary; per transition the sum over the ``k`` (100) most toxic
   lexicon tokens of ``s_r[v] tox_v`` and the same over the ``k`` least toxic ones, plus each
   set's mean shift relative to the vocabulary's mean shift, which is free of uniform logit
   shifts (:func:`lexicon_relation`), for prompt and response states.
6. **PCA** (Figure 2): 3 components fitted on all per-round states of both groups; each sample's
   round-to-round moves drawn as arrows in PC1-PC2. **SVD** of the stacked differences: the share
   of their squared norm in the top 1 and top 2 singular directions.
7. **Steering vectors** per layer from prompts *not* in the study: the most toxic prompts by
   decreasing toxicity paired with the least toxic by increasing toxicity
   (:func:`steerlab.data.contrast_from_scores`), ``SteeringVector.fit`` at every
   ``blocks.{l}.resid_post`` (mean difference non-toxic minus toxic, ``steer_positions``, unit
   norm). **What is compared:** at each layer ``l``, the mean round shift of ``resid_post`` at the
   last prompt token, ``P_{r,l} = mean_i (h_l(i, r+1) - h_l(i, r))``, with the layer-``l`` vector
   ``s_l``: cosine, ``lambda = <P, s> / <s, s>`` and the rejection norm ``||P - lambda s||``; also
   the mean over samples of the per-sample cosine. Controls: the same cosine with ``n_controls``
   random Gaussian and coordinate-permuted versions of ``s_l`` (mean and std over seeds). With
   both groups, the same is done for the *contrast* ``P_detox - P_toxify`` (pseudo-group
   ``detox-toxify``), which removes the part of the shift that both corrections share.
   (The paper's ``final``-state shift is in the *prompt* state; ``resid_post`` of the last layer
   is the same stream before the final norm.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..explain.shifts import lexicon_relation, logit_shift, moved_as_instructed, projection_stats, svd_shares
from ..runs import write_csv

CONTRAST = "detox-toxify"
"""Pseudo-group of the steering comparison: the detox group's mean shift minus the toxify group's,
which removes what both corrections share (a new user turn, the words of the instructions)."""
STATE_KINDS = ("prompt", "response")
PAPER = "arXiv 2505.11924"


@dataclass
class SelfCorrectResult:
    """What :func:`run_selfcorrect` returns: the run directory and the main tables (lists of dict rows)."""

    path: Path
    headline: dict
    toxicity: list[dict] = field(default_factory=list)
    lexicon: list[dict] = field(default_factory=list)
    cosine: list[dict] = field(default_factory=list)
    svd: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    pca: dict[str, np.ndarray] = field(default_factory=dict)           # state kind -> [R, N, n_pc]
    pca_explained: dict[str, list[float]] = field(default_factory=dict)
    rows_by_round: list[list[dict]] = field(default_factory=list)      # per round, per sample


def _stats(x: np.ndarray) -> tuple[float, float]:
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(np.mean(x)), float(np.std(x))


def _toxicity_tables(cfg, samples, groups, gidx, tox, moved, rows_by_round) -> tuple[list[dict], list[dict]]:
    """Per-sample table and toxicity per round (Table 1 / Figure 1), all samples and the moved subset."""
    R = tox.shape[1]
    sample_rows = []
    for s in samples:
        row = {"sample": s.index, "group": s.group, "instruction": s.instruction, "prompt_id": s.prompt_id,
               "prompt_toxicity": s.prompt_toxicity, "moved_as_instructed": bool(moved[s.index])}
        row.update({f"tox_round{r + 1}": float(tox[s.index, r]) for r in range(R)})
        row["prompt"] = s.prompt
        sample_rows.append(row)
    tox_rows = []
    for g in groups:
        for subset, idx in (("all", gidx[g]), ("moved", gidx[g][moved[gidx[g]]])):
            for r in range(R):
                m, sd = _stats(tox[idx, r])
                tox_rows.append({"group": g, "subset": subset, "round": r + 1, "n": len(idx), "mean": m, "std": sd,
                                 "marker_found": float(np.mean([rows_by_round[r][i]["marker_found"] for i in idx]))
                                 if len(idx) else float("nan")})
    return sample_rows, tox_rows


def _pca_svd_tables(cfg, samples, groups, gidx, S, D) -> tuple[dict, dict, list[dict], list[dict]]:
    """PCA (3 components) of all per-round states and SVD shares of the differences (Figure 2)."""
    from sklearn.decomposition import PCA

    R, N = S["prompt"].shape[:2]
    T = R - 1
    coords, pca_info, pca_rows, svd_rows = {}, {}, [], []
    for k in STATE_KINDS:
        X = S[k].reshape(R * N, -1)
        nc = min(3, X.shape[0], X.shape[1])
        pca = PCA(n_components=nc, random_state=cfg.seed)
        Z = pca.fit_transform(X).reshape(R, N, nc)
        coords[k] = Z
        pca_info[k] = [float(v) for v in pca.explained_variance_ratio_]
        for i in range(N):
            for r in range(R):
                pca_rows.append({"state": k, "sample": i, "group": samples[i].group, "round": r + 1,
                                 **{f"pc{c + 1}": float(Z[r, i, c]) for c in range(nc)}})
        for g in groups:
            Dg = D[k][gidx[g]]  # [n, T, d]
            svd_rows.append({"group": g, "state": k, "transitions": "all", **svd_shares(Dg.reshape(-1, Dg.shape[-1]))})
            for t in range(T):
                svd_rows.append({"group": g, "state": k, "transitions": f"{t + 1}->{t + 2}", **svd_shares(Dg[:, t])})
    return coords, pca_info, pca_rows, svd_rows


def _mean_sample_cos(per: np.ndarray, v: np.ndarray) -> float:
    """Mean over samples of cos(per-sample shift, v); a zero shift counts 0."""
    norms = np.linalg.norm(per, axis=1) * np.linalg.norm(v)
    return float(np.mean(np.where(norms > 0, per @ v / np.where(norms > 0, norms, 1), 0.0)))


def _cosine_table(cfg, groups, gidx, resid: np.ndarray, sv, n_layers: int) -> list[dict]:
    """Each group's (and the detox-toxify contrast's) mean round shift of ``resid_post`` at every
    layer against that layer's steering vector: cosine, lambda, rejection norm, per-sample cosine,
    and the cosine with random and permuted controls."""
    T = resid.shape[0] - 1
    controls_r = [sv.random(cfg.seed + 1 + c) for c in range(cfg.n_controls)]
    controls_p = [sv.permuted(cfg.seed + 1 + c) for c in range(cfg.n_controls)]
    shifts = {g: [resid[t + 1, gidx[g]] - resid[t, gidx[g]] for t in range(T)] for g in groups}  # [n, L, d] each
    compared: list[tuple[str, list[np.ndarray], list[np.ndarray | None]]] = [
        (g, [d.mean(0) for d in shifts[g]], list(shifts[g])) for g in groups]
    if len(groups) == 2:  # the instruction-specific part: what detox does that toxify does not
        compared.append((CONTRAST, [a.mean(0) - b.mean(0) for a, b in zip(shifts["detox"], shifts["toxify"])],
                         [None] * T))
    rows = []
    for name, means, per_sample in compared:
        for t in range(T):
            for layer in range(n_layers):
                site = f"blocks.{layer}.resid_post"
                v = sv.directions[site].numpy().astype(np.float64)
                P = means[t][layer].astype(np.float64)
                ps = projection_stats(P, v)
                mean_cos = float("nan") if per_sample[t] is None else \
                    _mean_sample_cos(per_sample[t][:, layer].astype(np.float64), v)
                rc = [projection_stats(P, c.directions[site].numpy())["cos"] for c in controls_r]
                pc = [projection_stats(P, c.directions[site].numpy())["cos"] for c in controls_p]
                rows.append({"group": name, "transition": f"{t + 1}->{t + 2}", "layer": layer, "cos": ps["cos"],
                             "mean_sample_cos": mean_cos, "lambda": ps["lambda"],
                             "rejection_norm": ps["rejection_norm"], "shift_norm": ps["shift_norm"],
                             "random_cos_mean": float(np.mean(rc)), "random_cos_std": float(np.std(rc)),
                             "permuted_cos_mean": float(np.mean(pc)), "permuted_cos_std": float(np.std(pc))})
    return rows


def analyse(model, path: Path, cfg, samples, groups: list[str], tox: np.ndarray, S: dict[str, np.ndarray], sv,
            lexicon, rows_by_round) -> SelfCorrectResult:
    """Every table of the study, written under ``path / "tables"``, and the headline numbers."""
    tables = path / "tables"
    gidx = {g: np.array([s.index for s in samples if s.group == g], dtype=int) for g in groups}
    sign = np.array([-1.0 if s.group == "detox" else 1.0 for s in samples])
    moved = moved_as_instructed(tox, sign, cfg.moved_share, cfg.moved_rel)
    sample_rows, tox_rows = _toxicity_tables(cfg, samples, groups, gidx, tox, moved, rows_by_round)
    write_csv(tables / "samples.csv", sample_rows)
    write_csv(tables / "toxicity_per_round.csv", tox_rows)
    D = {k: np.transpose(S[k][1:] - S[k][:-1], (1, 0, 2)) for k in STATE_KINDS}  # [N, T, d]
    lex_rows: list[dict] = []
    if lexicon is not None:  # logit-lens relation (Table 2)
        ids, sc = lexicon
        for g in groups:
            for k in STATE_KINDS:
                for row in lexicon_relation(logit_shift(D[k][gidx[g]], model.W_U), ids, sc, cfg.lexicon_k):
                    lex_rows.append({"group": g, "state": k, **row})
        write_csv(tables / "lexicon_relation.csv", lex_rows)
    coords, pca_info, pca_rows, svd_rows = _pca_svd_tables(cfg, samples, groups, gidx, S, D)
    write_csv(tables / "pca_coords.csv", pca_rows)
    write_csv(tables / "svd.csv", svd_rows)
    cos_rows = _cosine_table(cfg, groups, gidx, S["resid"], sv, model.n_layers)
    write_csv(tables / "steering_cosine.csv", cos_rows)
    headline = _headline(cfg, samples, groups, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info)
    return SelfCorrectResult(path, headline, tox_rows, lex_rows, cos_rows, svd_rows, sample_rows, coords, pca_info,
                             rows_by_round)


def _first_shift(rows: list[dict]) -> dict[str, list[float]]:
    return {"first_shift_cos_by_layer": [round(r["cos"], 4) for r in rows],
            "first_shift_random_cos": [round(r["random_cos_mean"], 4) for r in rows],
            "first_shift_random_std": [round(r["random_cos_std"], 4) for r in rows],
            "first_shift_permuted_cos": [round(r["permuted_cos_mean"], 4) for r in rows]}


def _group_headline(cfg, g, gi, moved, tox_rows, lex_rows, svd_rows, cos_rows) -> dict[str, Any]:
    gh: dict[str, Any] = {"n": len(gi), "instruction": cfg.detox if g == "detox" else cfg.toxify,
                          "moved_as_instructed": int(moved[gi].sum())}
    for key, subset, stat in (("toxicity_mean", "all", "mean"), ("toxicity_std", "all", "std"),
                              ("toxicity_mean_moved", "moved", "mean")):
        gh[key] = [r[stat] for r in tox_rows if r["group"] == g and r["subset"] == subset]
    first = [r for r in cos_rows if r["group"] == g and r["transition"] == "1->2"]
    if first:
        best = max(first, key=lambda r: abs(r["cos"]))
        gh.update(_first_shift(first))
        gh["first_shift_max_abs_cos"] = {"layer": best["layer"], "cos": best["cos"]}
        gh["first_shift_lambda_last_layer"] = first[-1]["lambda"]
    gh["shift_norm_by_transition"] = {
        tr: float(np.mean([r["shift_norm"] for r in cos_rows if r["group"] == g and r["transition"] == tr]))
        for tr in dict.fromkeys(r["transition"] for r in cos_rows if r["group"] == g)}
    lx = [r for r in lex_rows if r["group"] == g and r["state"] == "prompt"]
    if lx:
        gh["lexicon_first"] = {k: lx[0][k] for k in ("toxic_weighted", "nontoxic_weighted", "gap")}
    sv_all = [r for r in svd_rows if r["group"] == g and r["state"] == "prompt" and r["transitions"] == "all"]
    if sv_all:
        gh["svd_rank1_share"] = sv_all[0]["rank1_share"]
        gh["svd_rank2_share"] = sv_all[0]["rank2_share"]
    return gh


def _headline(cfg, samples, groups, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info) -> dict:
    h: dict[str, Any] = {"paper": PAPER, "rounds": cfg.rounds, "n": len(samples), "pca_explained_variance": pca_info}
    for g in groups:
        gi = [s.index for s in samples if s.group == g]
        h[g] = _group_headline(cfg, g, gi, moved, tox_rows, lex_rows, svd_rows, cos_rows)
    first = [r for r in cos_rows if r["group"] == CONTRAST and r["transition"] == "1->2"]
    if first:
        h[CONTRAST] = _first_shift(first)
    return h


def json_safe(obj):
    """NaN and infinities become None (strict JSON); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
