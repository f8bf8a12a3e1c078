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
import torch

from ..explain.shifts import (
    bootstrap_shift_stats,
    lexicon_relation,
    logit_shift,
    max_stat_pvalues,
    moved_as_instructed,
    projection_stats,
    svd_shares,
)
from ..generation import derive_seed
from ..metrics import bootstrap_mean, paired_difference
from ..protocols.selfcorrect import get_instruction
from ..runs import write_csv

CONTRAST = "detox-toxify"
"""Pseudo-group of the steering comparison: the detox group's mean shift minus the toxify group's,
which removes what both corrections share (a new user turn, the words of the instructions)."""
STATE_KINDS = ("prompt", "response")
PAPER = "arXiv 2505.11924"
SIGNS = {"detox": -1.0, "toxify": 1.0, "neutral": 0.0}
"""Instructed direction of toxicity per instruction direction (a neutral rewrite never "moves as instructed")."""


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
    best_layer: list[dict] = field(default_factory=list)               # tables/steering_best_layer.csv
    arm_differences: list[dict] = field(default_factory=list)          # tables/arm_differences.csv (crossed)
    vector_lexicon: list[dict] = field(default_factory=list)           # tables/vector_lexicon.csv


def _stats(x: np.ndarray) -> tuple[float, float]:
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(np.mean(x)), float(np.std(x))


def _ci(x: np.ndarray, cfg, seed: int) -> tuple[float, float]:
    if len(x) < 2:
        return float("nan"), float("nan")
    est = bootstrap_mean(x, n_boot=cfg.n_boot, seed=seed)
    return est.lo, est.hi


def _prompt_sets(samples, idx: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``("all", idx)`` and one entry per prompt kind when a group mixes toxic and non-toxic prompts."""
    kinds = list(dict.fromkeys(samples[i].prompt_kind for i in idx))
    if len(kinds) == 1:
        return [(kinds[0], idx)]
    return [("all", idx)] + [(k, np.array([i for i in idx if samples[i].prompt_kind == k], dtype=int)) for k in kinds]


def _toxicity_tables(cfg, samples, groups, gidx, tox, moved, rows_by_round) -> tuple[list[dict], list[dict]]:
    """Per-sample table and toxicity per round (Table 1 / Figure 1), all samples and the moved subset,
    with a bootstrap CI over prompts of each mean (``lo``, ``hi``)."""
    R = tox.shape[1]
    sample_rows = []
    for s in samples:
        row = {"sample": s.index, "group": s.group, "instruction": s.instruction, "prompt_id": s.prompt_id,
               "prompt_kind": s.prompt_kind, "prompt_toxicity": s.prompt_toxicity,
               "moved_as_instructed": bool(moved[s.index])}
        row.update({f"tox_round{r + 1}": float(tox[s.index, r]) for r in range(R)})
        row["prompt"] = s.prompt
        sample_rows.append(row)
    tox_rows = []
    for g in groups:
        for prompts, pidx in _prompt_sets(samples, gidx[g]):
            for subset, idx in (("all", pidx), ("moved", pidx[moved[pidx]])):
                for r in range(R):
                    m, sd = _stats(tox[idx, r])
                    lo, hi = _ci(tox[idx, r], cfg, derive_seed("tox", cfg.seed, g, prompts, subset, r))
                    tox_rows.append({"group": g, "prompts": prompts, "subset": subset, "round": r + 1, "n": len(idx),
                                     "mean": m, "std": sd, "lo": lo, "hi": hi,
                                     "marker_found": float(np.mean([rows_by_round[r][i]["marker_found"] for i in idx]))
                                     if len(idx) else float("nan")})
    return sample_rows, tox_rows


def _arm_differences(cfg, samples, groups, gidx, tox) -> list[dict]:
    """Crossed design: for every pair of arms, toxicity of arm ``a`` minus arm ``b`` per round on the
    same prompts (paired bootstrap over prompts, :func:`steerlab.metrics.paired_difference`)."""
    rows = []
    for ai, a in enumerate(groups):
        for b in groups[ai + 1:]:
            for prompts, pidx in _prompt_sets(samples, gidx[a]):
                pos = np.searchsorted(gidx[a], pidx)  # the same prompts, in the same order, in arm b
                ia, ib = gidx[a][pos], gidx[b][pos]
                for r in range(tox.shape[1]):
                    d = paired_difference(tox[ib, r], tox[ia, r], n_boot=cfg.n_boot,
                                          seed=derive_seed("arms", cfg.seed, a, b, prompts, r))
                    mt = d.mean_toxicity
                    rows.append({"arm": a, "minus": b, "prompts": prompts, "round": r + 1, "n": len(ia),
                                 "diff": mt.value, "lo": mt.lo, "hi": mt.hi,
                                 "p_not_lower": d.p_not_lower["mean_toxicity"]})
    return rows


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


def _against(per: np.ndarray | None, mean: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Cosine of the mean shift ``[L, d]`` and mean per-sample cosine (``per`` ``[n, L, d]``) with each of
    ``J`` vector sets ``V`` ``[J, L, d]``: two ``[J, L]`` arrays (the second None without samples)."""
    Vn = V / np.maximum(np.linalg.norm(V, axis=-1, keepdims=True), 1e-12)
    mn = np.linalg.norm(mean, axis=-1)
    cos = np.einsum("ld,jld->jl", mean, Vn) / np.where(mn > 0, mn, 1.0)
    if per is None:
        return cos, None
    pn = np.linalg.norm(per, axis=-1)  # [n, L]
    unit = per / np.where(pn > 0, pn, 1.0)[..., None]
    msc = np.stack([unit[:, layer] @ Vn[:, layer].T for layer in range(per.shape[1])], -1).mean(0)  # [J, L]
    return cos, msc


def _shift_sets(cfg, groups, gidx, samples, X: np.ndarray) -> list[tuple[str, list, list]]:
    """(name, per-transition per-sample shifts ``[n, L, d]`` or None, per-transition mean shifts) of each
    group and contrast for states ``X`` ``[R, N, L, d]``."""
    T = X.shape[0] - 1
    shifts = {g: [X[t + 1, gidx[g]] - X[t, gidx[g]] for t in range(T)] for g in groups}
    out = [(g, shifts[g], [d.mean(0) for d in shifts[g]]) for g in groups]
    for a, b in _contrasts(cfg, groups):
        if cfg.arm_kinds():  # crossed: the same prompts in both arms, so the contrast is per prompt
            per = [x - y for x, y in zip(shifts[a], shifts[b])]
            out.append((f"{a}-{b}", per, [d.mean(0) for d in per]))
        else:
            out.append((CONTRAST, [None] * T, [x.mean(0) - y.mean(0) for x, y in zip(shifts[a], shifts[b])]))
    return out


def _contrasts(cfg, groups) -> list[tuple[str, str]]:
    """Arm pairs compared with the steering vectors: detox minus toxify in the paper's design; in the
    crossed design every arm minus the (first) neutral arm, or the first detox minus the first toxify."""
    if not cfg.arm_kinds():
        return [("detox", "toxify")] if len(groups) == 2 else []
    dirs = {g: get_instruction(g).direction for g in groups}
    neutral = [g for g in groups if dirs[g] == "neutral"]
    if neutral:
        return [(g, neutral[0]) for g in groups if dirs[g] != "neutral"]
    det, tox = [g for g in groups if dirs[g] == "detox"], [g for g in groups if dirs[g] == "toxify"]
    return [(det[0], tox[0])] if det and tox else []


def _cosine_table(cfg, groups, gidx, samples, S, sv, null: np.ndarray | None, n_layers: int
                  ) -> tuple[list[dict], list[dict]]:
    """Each group's (and contrast's) round shifts against every layer's steering vector, for three
    states: ``prompt`` (resid_post at the last prompt token), ``response`` (resid_post, mean over the
    reply) and ``final_response`` (the paper's: the final-norm response mean, one state compared with
    every layer's vector). Per row: cosine of the mean shift, mean per-sample cosine (the paper's
    statistic) and lambda, each with a bootstrap CI over prompts; rejection norm; random, permuted and
    label-shuffled controls with per-layer p-values. Second table: the best layer of each statistic
    and its max-over-layers permutation p-value."""
    sites = [f"blocks.{layer}.resid_post" for layer in range(n_layers)]
    V = np.stack([sv.directions[s].numpy().astype(np.float64) for s in sites])  # [L, d]
    ctrl = {"random": np.stack([np.stack([c.directions[s].numpy() for s in sites])
                                for c in (sv.random(cfg.seed + 1 + j) for j in range(cfg.n_controls))]),
            "permuted": np.stack([np.stack([c.directions[s].numpy() for s in sites])
                                  for c in (sv.permuted(cfg.seed + 1 + j) for j in range(cfg.n_controls))])}
    final = np.broadcast_to(S["response"][:, :, None, :], S["resid_response"].shape)
    rows, best_rows = [], []
    for state, X in (("prompt", S["resid"]), ("response", S["resid_response"]), ("final_response", final)):
        for name, pers, means in _shift_sets(cfg, groups, gidx, samples, X):
            for t, (per, mean) in enumerate(zip(pers, means)):
                r, b = _cosine_rows(cfg, name, state, t, per, np.asarray(mean, np.float64), V, ctrl, null)
                rows += r
                best_rows += b
    return rows, best_rows


def _cosine_rows(cfg, name, state, t, per, mean, V, ctrl, null) -> tuple[list[dict], list[dict]]:
    """The rows of one (group, state, transition): see :func:`_cosine_table`."""
    L = V.shape[0]
    tr = f"{t + 1}->{t + 2}"
    if per is not None and len(per) >= 1:
        bs = bootstrap_shift_stats(per, V, cfg.n_boot, seed=derive_seed("cos", cfg.seed, name, state, t))
    else:
        nan = np.full(L, np.nan)
        bs = {f"{k}{x}": nan for k in ("cos", "mean_sample_cos", "lambda") for x in ("", "_lo", "_hi")}
    c = {k: _against(per, mean, v) for k, v in ctrl.items()}
    obs_cos, obs_msc = _against(per, mean, V[None])
    nl = _against(per, mean, null) if null is not None else None
    tests = {}
    if nl is not None:
        tests["cos"] = max_stat_pvalues(obs_cos[0], nl[0])
        if obs_msc is not None:
            tests["mean_sample_cos"] = max_stat_pvalues(obs_msc[0], nl[1])
    rows = []
    for layer in range(L):
        ps = projection_stats(mean[layer], V[layer])
        row = {"group": name, "state": state, "transition": tr, "layer": layer,
               "n": 0 if per is None else len(per), "cos": ps["cos"],
               "cos_lo": bs["cos_lo"][layer], "cos_hi": bs["cos_hi"][layer],
               "mean_sample_cos": np.nan if obs_msc is None else obs_msc[0, layer],
               "msc_lo": bs["mean_sample_cos_lo"][layer], "msc_hi": bs["mean_sample_cos_hi"][layer],
               "lambda": ps["lambda"], "lambda_lo": bs["lambda_lo"][layer], "lambda_hi": bs["lambda_hi"][layer],
               "rejection_norm": ps["rejection_norm"], "shift_norm": ps["shift_norm"]}
        for k, (cc, mm) in c.items():
            row.update({f"{k}_cos_mean": float(cc[:, layer].mean()), f"{k}_cos_std": float(cc[:, layer].std()),
                        f"{k}_msc_mean": np.nan if mm is None else float(mm[:, layer].mean())})
        if nl is not None:
            row.update({"null_cos_mean": float(nl[0][:, layer].mean()), "null_cos_std": float(nl[0][:, layer].std()),
                        "p_cos": tests["cos"]["p_layer"][layer]})
            if nl[1] is not None:
                row.update({"null_msc_mean": float(nl[1][:, layer].mean()),
                            "null_msc_std": float(nl[1][:, layer].std()),
                            "p_msc": tests["mean_sample_cos"]["p_layer"][layer]})
        rows.append(row)
    best = [{"group": name, "state": state, "transition": tr, "statistic": k, "best_layer": v["best_layer"],
             "value": (obs_cos if k == "cos" else obs_msc)[0, v["best_layer"]],
             "p_layer_uncorrected": v["p_layer"][v["best_layer"]], "p_max_over_layers": v["p_max"],
             "null_max_abs_q95": v["null_max_q95"], "n_null": len(null)} for k, v in tests.items()]
    return rows, best


def vector_lexicon(model, sv, lexicon, k: int) -> list[dict]:
    """How each layer's steering vector moves the token-toxicity lexicon under the logit lens: ``U s_l``
    (the direct logit effect of adding ``s_l`` before the unembedding, ``model.unembed.direct_effect``),
    read with :func:`lexicon_relation`; one row per layer."""
    ids, sc = lexicon
    layers = range(model.n_layers)
    V = torch.stack([sv.directions[f"blocks.{layer}.resid_post"] for layer in layers])
    shift = model.unembed.direct_effect(V).double().cpu().numpy()
    rows = []
    for layer, row in zip(layers, lexicon_relation(shift, ids, sc, k)):
        row.pop("transition")
        rows.append({"layer": layer, **row})
    return rows


def analyse(model, path: Path, cfg, samples, groups: list[str], tox: np.ndarray, S: dict[str, np.ndarray], sv,
            lexicon, rows_by_round, null: np.ndarray | None = None) -> SelfCorrectResult:
    """Every table of the study, written under ``path / "tables"``, and the headline numbers."""
    tables = path / "tables"
    gidx = {g: np.array([s.index for s in samples if s.group == g], dtype=int) for g in groups}
    sign = np.array([SIGNS[get_instruction(s.instruction).direction] for s in samples])
    moved = moved_as_instructed(tox, sign, cfg.moved_share, cfg.moved_rel)
    sample_rows, tox_rows = _toxicity_tables(cfg, samples, groups, gidx, tox, moved, rows_by_round)
    write_csv(tables / "samples.csv", sample_rows)
    write_csv(tables / "toxicity_per_round.csv", tox_rows)
    arm_rows = _arm_differences(cfg, samples, groups, gidx, tox) if cfg.arm_kinds() else []
    if arm_rows:
        write_csv(tables / "arm_differences.csv", arm_rows)
    D = {k: np.transpose(S[k][1:] - S[k][:-1], (1, 0, 2)) for k in STATE_KINDS}  # [N, T, d]
    lex_rows: list[dict] = []
    vec_rows: list[dict] = []
    if lexicon is not None:  # logit-lens relation (Table 2) and the steering vectors under the same lens
        ids, sc = lexicon
        for g in groups:
            for k in STATE_KINDS:
                for row in lexicon_relation(logit_shift(D[k][gidx[g]], model.unembed), ids, sc, cfg.lexicon_k):
                    lex_rows.append({"group": g, "state": k, **row})
        write_csv(tables / "lexicon_relation.csv", lex_rows)
        vec_rows = vector_lexicon(model, sv, lexicon, cfg.lexicon_k)
        write_csv(tables / "vector_lexicon.csv", vec_rows)
    coords, pca_info, pca_rows, svd_rows = _pca_svd_tables(cfg, samples, groups, gidx, S, D)
    write_csv(tables / "pca_coords.csv", pca_rows)
    write_csv(tables / "svd.csv", svd_rows)
    cos_rows, best_rows = _cosine_table(cfg, groups, gidx, samples, S, sv, null, model.n_layers)
    write_csv(tables / "steering_cosine.csv", cos_rows)
    if best_rows:
        write_csv(tables / "steering_best_layer.csv", best_rows)
    headline = _headline(cfg, samples, groups, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info, best_rows)
    return SelfCorrectResult(path, headline, tox_rows, lex_rows, cos_rows, svd_rows, sample_rows, coords, pca_info,
                             rows_by_round, best_rows, arm_rows, vec_rows)


def _first_shift(rows: list[dict], best_rows: list[dict], name: str) -> dict[str, Any]:
    """Headline numbers of the round 1->2 shift of one group: prompt-state cosines with controls, the
    paper's statistic (final-norm response mean, mean per-sample cosine) and the best layers."""
    pr = [r for r in rows if r["state"] == "prompt"]
    fr = [r for r in rows if r["state"] == "final_response"]
    out: dict[str, Any] = {"first_shift_cos_by_layer": [round(r["cos"], 4) for r in pr],
                           "first_shift_random_cos": [round(r["random_cos_mean"], 4) for r in pr],
                           "first_shift_random_std": [round(r["random_cos_std"], 4) for r in pr],
                           "first_shift_permuted_cos": [round(r["permuted_cos_mean"], 4) for r in pr]}
    if fr and fr[0]["n"]:
        out["first_shift_paper_stat_by_layer"] = [round(r["mean_sample_cos"], 4) for r in fr]
        out["first_shift_paper_stat_ci"] = [[round(r["msc_lo"], 4), round(r["msc_hi"], 4)] for r in fr]
    out["best_layer"] = {f"{b['state']}/{b['statistic']}": {k: b[k] for k in ("best_layer", "value",
                                                                             "p_max_over_layers")}
                         for b in best_rows if b["group"] == name and b["transition"] == "1->2"}
    return out


def _group_headline(cfg, g, gi, samples, moved, tox_rows, lex_rows, svd_rows, cos_rows, best_rows) -> dict[str, Any]:
    gh: dict[str, Any] = {"n": len(gi), "instruction": samples[gi[0]].instruction,
                          "moved_as_instructed": int(moved[gi].sum())}
    own = [r for r in tox_rows if r["group"] == g and r["prompts"] == tox_rows_key(tox_rows, g)]
    for key, subset, stat in (("toxicity_mean", "all", "mean"), ("toxicity_std", "all", "std"),
                              ("toxicity_mean_moved", "moved", "mean"), ("toxicity_lo", "all", "lo"),
                              ("toxicity_hi", "all", "hi")):
        gh[key] = [r[stat] for r in own if r["subset"] == subset]
    first = [r for r in cos_rows if r["group"] == g and r["transition"] == "1->2"]
    prompt_first = [r for r in first if r["state"] == "prompt"]
    if prompt_first:
        best = max(prompt_first, key=lambda r: abs(r["cos"]))
        gh.update(_first_shift(first, best_rows, g))
        gh["first_shift_max_abs_cos"] = {"layer": best["layer"], "cos": best["cos"]}
        gh["first_shift_lambda_last_layer"] = prompt_first[-1]["lambda"]
    pr = [r for r in cos_rows if r["group"] == g and r["state"] == "prompt"]
    gh["shift_norm_by_transition"] = {tr: float(np.mean([r["shift_norm"] for r in pr if r["transition"] == tr]))
                                      for tr in dict.fromkeys(r["transition"] for r in pr)}
    lx = [r for r in lex_rows if r["group"] == g and r["state"] == "prompt"]
    if lx:
        gh["lexicon_first"] = {k: lx[0][k] for k in ("toxic_weighted", "nontoxic_weighted", "gap")}
    sv_all = [r for r in svd_rows if r["group"] == g and r["state"] == "prompt" and r["transitions"] == "all"]
    if sv_all:
        gh["svd_rank1_share"] = sv_all[0]["rank1_share"]
        gh["svd_rank2_share"] = sv_all[0]["rank2_share"]
    return gh


def tox_rows_key(tox_rows: list[dict], g: str) -> str:
    """The prompt set of a group's headline toxicity: ``all`` when the group mixes prompt kinds."""
    kinds = [r["prompts"] for r in tox_rows if r["group"] == g]
    return "all" if "all" in kinds else kinds[0]


def _headline(cfg, samples, groups, moved, tox_rows, lex_rows, svd_rows, cos_rows, pca_info, best_rows) -> dict:
    h: dict[str, Any] = {"paper": PAPER, "rounds": cfg.rounds, "n": len(samples), "pca_explained_variance": pca_info,
                         "groups": list(groups), "design": "crossed" if cfg.arm_kinds() else "paper"}
    for g in groups:
        gi = [s.index for s in samples if s.group == g]
        h[g] = _group_headline(cfg, g, gi, samples, moved, tox_rows, lex_rows, svd_rows, cos_rows, best_rows)
    contrasts = [n for n in dict.fromkeys(r["group"] for r in cos_rows) if n not in groups]
    h["contrasts"] = contrasts
    for name in contrasts:
        first = [r for r in cos_rows if r["group"] == name and r["transition"] == "1->2"]
        h[name] = _first_shift(first, best_rows, name)
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
