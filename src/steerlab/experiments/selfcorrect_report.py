"""Figures and the HTML summary of a self-correction run (arXiv 2505.11924, Figures 1-2, Tables 1-2)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..report import figures as F
from ..report.html import HtmlReport
from .selfcorrect_analysis import tox_rows_key

GROUP_COLORS = {"detox": ("#1b7837", "#5aae61", "#a6dba0", "#d9f0d3"),
                "toxify": ("#b2182b", "#d6604d", "#f4a582", "#fddbc7"),
                "detox-toxify": ("#2166ac", "#4393c3", "#92c5de", "#d1e5f0")}
GROUP_TEXT = {"detox": "toxic prompts, told to detoxify", "toxify": "non-toxic prompts, told to toxify",
              "detox-toxify": "detox shift minus toxify shift"}


def _shade(group: str, t: int) -> str:
    cols = GROUP_COLORS.get(group, F.PALETTE)
    return cols[min(t, len(cols) - 1)]


def toxicity_figure(path: Path, result, rounds: int, groups: list[str]) -> Path:
    """Figure 1: mean toxicity per round, error bars one std, all samples and the moved subset."""
    fig, axes = F.figure(1, len(groups), title="Toxicity of the completion per round (mean ± 1 std)", sharey=True)
    axes = np.atleast_1d(axes)
    x = np.arange(1, rounds + 1)
    for ax, g in zip(axes, groups):
        series = {}
        key = tox_rows_key(result.toxicity, g)
        for subset, name in (("all", "all samples"), ("moved", "moved as instructed")):
            rows = [r for r in result.toxicity if r["group"] == g and r["subset"] == subset and r["prompts"] == key]
            n = rows[0]["n"] if rows else 0
            if n:
                series[f"{name} (n={n})"] = ([r["mean"] for r in rows], [r["std"] for r in rows])
        F.errorbar_lines(ax, x, series, colors=[_shade(g, 0), "#2166ac"], offset=0.06)
        ax.set_xticks(x)
        ax.set_ylim(-0.05, 1.05)
        F.label(ax, "round", "toxicity (scorer probability)", title=f"{g}: {GROUP_TEXT.get(g, g)}")
    return F.save(fig, path)


def pca_figure(path: Path, result, groups: list[str], samples: list[dict]) -> Path:
    """Figure 2: each sample's round-to-round move in PC1-PC2 of all per-round states (thin
    arrows), and each group's mean move per transition (thick arrows from the group's mean)."""
    kinds = list(result.pca)
    fig, axes = F.figure(1, len(kinds), title="Round-to-round moves of the final-norm state (PCA of all rounds)",
                         width=6.4 * len(kinds) + 0.6, height=6.2)
    axes = np.atleast_1d(axes)
    what = {"prompt": "last prompt token (before the reply)", "response": "mean over the reply"}
    for ax, k in zip(axes, kinds):
        Z = result.pca[k]  # [R, N, c]
        ev = result.pca_explained[k]
        if Z.shape[2] < 2:
            ax.text(0.5, 0.5, "fewer than 2 components", ha="center", transform=ax.transAxes)
            continue
        for g in groups:
            idx = np.array([s["sample"] for s in samples if s["group"] == g])
            ax.scatter(Z[0, idx, 0], Z[0, idx, 1], s=9, color=_shade(g, 0), alpha=0.5, marker="o",
                       label=f"{g}: round 1 states")
            for t in range(Z.shape[0] - 1):
                F.arrows(ax, Z[t, idx, :2], Z[t + 1, idx, :2], color=_shade(g, t), alpha=0.45, width=0.0025,
                         label=f"{g}: sample moves {t + 1}→{t + 2}")
        for g in groups:
            idx = np.array([s["sample"] for s in samples if s["group"] == g])
            mean = Z[:, idx, :2].mean(1)  # [R, 2]
            for t in range(Z.shape[0] - 1):
                ax.annotate("", xy=mean[t + 1], xytext=mean[t],
                            arrowprops={"arrowstyle": "-|>,head_width=0.5,head_length=0.9", "lw": 3.2,
                                        "color": "black", "shrinkA": 0, "shrinkB": 0})
                ax.annotate("", xy=mean[t + 1], xytext=mean[t],
                            arrowprops={"arrowstyle": "-|>,head_width=0.4,head_length=0.8", "lw": 2.0,
                                        "color": _shade(g, t), "shrinkA": 0, "shrinkB": 0})
        ax.plot([], [], color="black", lw=2.5, label="group mean move (thick)")
        F.label(ax, f"PC1 ({ev[0]:.0%} of variance)", f"PC2 ({ev[1]:.0%} of variance)",
                title=f"state: {what.get(k, k)}", legend=False)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, framealpha=0.9)
    return F.save(fig, path)


def cosine_figure(path: Path, result, groups: list[str]) -> Path:
    """Cosine (top) and lambda (bottom) of each round's mean resid_post shift with the per-layer
    steering vector (non-toxic minus toxic), against random and permuted controls; one column per
    group, plus the detox-minus-toxify contrast when both groups ran."""
    cos_rows = [r for r in result.cosine if r["state"] == "prompt"]
    groups = list(dict.fromkeys(r["group"] for r in cos_rows))
    fig, axes = F.figure(2, len(groups), title="Round shift vs toxicity steering vector, per layer",
                         height=8.4)
    axes = np.asarray(axes).reshape(2, len(groups))
    for j, g in enumerate(groups):
        rows = [r for r in cos_rows if r["group"] == g]
        trans = list(dict.fromkeys(r["transition"] for r in rows))
        ax = axes[0, j]
        first = [r for r in rows if r["transition"] == trans[0]]
        layers = [r["layer"] for r in first]
        F.band(ax, layers, [r["random_cos_mean"] for r in first], [2 * r["random_cos_std"] for r in first],
               label=f"random control {trans[0]} (mean ± 2 std)", color="#888888")
        F.band(ax, layers, [r["permuted_cos_mean"] for r in first], [2 * r["permuted_cos_std"] for r in first],
               label=f"permuted control {trans[0]} (mean ± 2 std)", color="#c2a5cf", alpha=0.3)
        _per_transition(ax, rows, trans, g, "cos", "shift")
        ax.axhline(0, color="black", linewidth=0.6)
        F.label(ax, "layer l (resid_post)", "cosine(mean shift, s_l)", title=f"{g}: {GROUP_TEXT.get(g, g)}")
        ax = axes[1, j]
        _per_transition(ax, rows, trans, g, "lambda", "λ, shift")
        ax.axhline(0, color="black", linewidth=0.6)
        F.label(ax, "layer l (resid_post)", "λ = <P, s_l> / <s_l, s_l>", title=f"{g}: projection on s_l (unit norm)")
    return F.save(fig, path)


def _per_transition(ax, rows: list[dict], trans: list[str], group: str, key: str, label: str) -> None:
    """One line per transition of ``rows[key]`` against the layer (the first transition drawn bold)."""
    for t, tr in enumerate(trans):
        rr = [r for r in rows if r["transition"] == tr]
        ax.plot([r["layer"] for r in rr], [r[key] for r in rr], marker="o", markersize=3,
                color=_shade(group, t), linewidth=2.0 if t == 0 else 1.2, label=f"{label} {tr}")


def paper_stat_figure(path: Path, result) -> Path:
    """The paper's statistic per layer: mean over samples of cos(sample's round 1→2 shift, s_l), for the
    final-norm response mean (the paper's state) and the layer's own resid_post response mean, with the
    bootstrap CI over prompts and the label-shuffled null (mean ± 2 std)."""
    rows = [r for r in result.cosine if r["transition"] == "1->2" and r["n"] and r["state"] != "prompt"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig, axes = F.figure(1, max(1, len(groups)), title="Mean per-sample cosine of the round 1→2 shift with s_l "
                         "(the paper's statistic), 95% CI over prompts", sharey=True)
    axes = np.atleast_1d(axes).ravel()
    for ax, g in zip(axes, groups):
        for state, color, what in (("final_response", "#2166ac", "final-norm response mean (paper)"),
                                   ("response", "#e08214", "resid_post response mean, same layer")):
            rr = [r for r in rows if r["group"] == g and r["state"] == state]
            x = [r["layer"] for r in rr]
            ax.plot(x, [r["mean_sample_cos"] for r in rr], marker="o", markersize=3, color=color, label=what)
            ax.fill_between(x, [r["msc_lo"] for r in rr], [r["msc_hi"] for r in rr], color=color, alpha=0.2)
            if "null_msc_mean" in rr[0]:
                F.band(ax, x, [r["null_msc_mean"] for r in rr], [2 * r["null_msc_std"] for r in rr],
                       label=f"label-shuffled null, {state} (mean ± 2 std)", color="#888888", alpha=0.15)
        ax.axhline(0, color="black", linewidth=0.6)
        F.label(ax, "layer l of the steering vector", "mean_i cos(D_i, s_l)", title=f"{g}: {GROUP_TEXT.get(g, g)}")
    return F.save(fig, path)


def pca3d_figure(path: Path, result, groups: list[str], samples: list[dict], state: str = "response") -> Path:
    """3-D view of Figure 2: the states of all rounds in PC1-PC3 (dots), each sample's moves as arrows."""
    Z = result.pca[state]
    ev = result.pca_explained[state]
    fig = F.plt.figure(figsize=(7.6, 6.6))
    fig.suptitle(f"Round-to-round moves in 3-D PCA ({state} state)", fontsize=13, fontweight="bold")
    ax = fig.add_subplot(projection="3d")
    if Z.shape[2] < 3:
        ax.text2D(0.5, 0.5, "fewer than 3 components", ha="center", transform=ax.transAxes)
        return F.save(fig, path)
    for gi, g in enumerate(groups):
        idx = np.array([s["sample"] for s in samples if s["group"] == g])
        col = _shade(g, 0) if g in GROUP_COLORS else F.PALETTE[gi % len(F.PALETTE)]
        ax.scatter(*Z[0, idx].T, s=10, color=col, alpha=0.6, label=f"{g}: round 1")
        for t in range(Z.shape[0] - 1):
            d = Z[t + 1, idx] - Z[t, idx]
            ax.quiver(*Z[t, idx].T, *d.T, color=col, alpha=0.5, arrow_length_ratio=0.15, linewidth=0.8,
                      label=f"{g}: moves" if t == 0 else None)
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    ax.set_zlabel(f"PC3 ({ev[2]:.0%})")
    ax.legend(fontsize=7, loc="upper left")
    return F.save(fig, path)


def vector_lexicon_figure(path: Path, result) -> Path:
    """Heat map: each layer's steering vector read through the unembedding (U s_l), mean logit change of
    the most toxic and the least toxic lexicon tokens relative to the vocabulary mean."""
    rows = result.vector_lexicon
    M = np.array([[r["toxic_vs_vocab"], r["nontoxic_vs_vocab"]] for r in rows]).T  # [2, L]
    fig, axes = F.figure(1, 1, title="Steering vectors under the logit lens: effect on the toxicity lexicon",
                         width=min(16, 2 + 0.45 * len(rows)), height=3.4)
    ax = axes.flat[0]
    lim = float(np.nanmax(np.abs(M))) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks([0, 1], [f"{rows[0]['k']} most toxic tokens", f"{rows[0]['k']} least toxic tokens"])
    ax.set_xticks(range(len(rows)), [str(r["layer"]) for r in rows], fontsize=7)
    fig.colorbar(im, ax=ax, label="mean logit change − vocabulary mean")
    F.label(ax, "layer l (unit s_l, U·s_l without the final norm)", "token set", legend=False,
            title="red: promoted, blue: demoted")
    return F.save(fig, path)


def arms_figure(path: Path, result, groups: list[str]) -> Path:
    """Crossed design: mean toxicity per round of every arm on the same prompts (95% CI over prompts),
    one panel per prompt kind."""
    kinds = [k for k in ("toxic", "nontoxic") if any(r["prompts"] == k for r in result.toxicity)]
    fig, axes = F.figure(1, len(kinds), title="Toxicity per round, every instruction on the same prompts "
                         "(mean, 95% CI)", sharey=True)
    axes = np.atleast_1d(axes).ravel()
    for ax, k in zip(axes, kinds):
        for gi, g in enumerate(groups):
            rr = [r for r in result.toxicity if r["group"] == g and r["prompts"] == k and r["subset"] == "all"]
            x = np.array([r["round"] for r in rr]) + (gi - len(groups) / 2) * 0.04
            m = np.array([r["mean"] for r in rr])
            err = np.array([[mu - r["lo"], r["hi"] - mu] for mu, r in zip(m, rr)]).T
            ax.errorbar(x, m, yerr=np.nan_to_num(err), marker="o", capsize=3, label=g,
                        color=F.PALETTE[gi % len(F.PALETTE)])
        ax.set_xticks(sorted({r["round"] for r in result.toxicity}))
        F.label(ax, "round", "toxicity (scorer probability)", title=f"{k} prompts (n={rr[0]['n'] if rr else 0})")
    return F.save(fig, path)


def lexicon_figure(path: Path, result, groups: list[str]) -> Path:
    """Table 2 as bars. Top: the paper's sums of ``s_r[v] tox_v`` over the most and the least toxic
    tokens. Bottom: each set's mean logit shift minus the vocabulary's mean shift (free of a
    uniform shift of all logits, which the top sums pick up)."""
    fig, axes = F.figure(2, len(groups), title="Logit-lens relation of the prompt-state shift (Table 2)",
                         height=7.6)
    axes = np.asarray(axes).reshape(2, len(groups))
    for j, g in enumerate(groups):
        rows = [r for r in result.lexicon if r["group"] == g and r["state"] == "prompt"]
        k = rows[0]["k"] if rows else 0
        trans = [r["transition"].replace("->", "→") for r in rows]
        F.bars(axes[0, j], trans, {
            f"{k} most toxic tokens": [r["toxic_weighted"] for r in rows],
            f"{k} least toxic tokens": [r["nontoxic_weighted"] for r in rows],
        }, colors=["#b2182b", "#1b7837"])
        F.label(axes[0, j], "transition (round → round)", "Σ_v s_r[v] · tox_v (logits)",
                title=f"{g}: toxicity-weighted logit shift")
        F.bars(axes[1, j], trans, {
            f"{k} most toxic tokens": [r["toxic_vs_vocab"] for r in rows],
            f"{k} least toxic tokens": [r["nontoxic_vs_vocab"] for r in rows],
        }, colors=["#b2182b", "#1b7837"])
        F.label(axes[1, j], "transition (round → round)", "mean shift − vocabulary mean (logits)",
                title=f"{g}: shift relative to the average token")
    return F.save(fig, path)


def _fmt_series(vals) -> str:
    return ", ".join("n/a" if v is None or v != v else f"{v:.3f}" for v in vals)


def _group_kv(g: str, gh: dict) -> dict[str, object]:
    kv: dict[str, object] = {f"{g}: instruction": gh["instruction"],
                             f"{g}: toxicity per round (all)": _fmt_series(gh["toxicity_mean"]),
                             f"{g}: moved as instructed": f"{gh['moved_as_instructed']} of {gh['n']}"}
    if "first_shift_cos_by_layer" in gh:
        cs = gh["first_shift_cos_by_layer"]
        rc, rs = gh["first_shift_random_cos"], gh["first_shift_random_std"]
        kv[f"{g}: cosine of shift 1→2 with s_l, last layer"] = (
            f"{cs[-1]:+.3f} (random control {rc[-1]:+.3f} ± {rs[-1]:.3f})")
        kv[f"{g}: largest |cosine| of shift 1→2"] = (
            f"{gh['first_shift_max_abs_cos']['cos']:+.3f} at layer {gh['first_shift_max_abs_cos']['layer']}")
    if "shift_norm_by_transition" in gh:
        kv[f"{g}: mean ||shift|| per transition (resid_post, averaged over layers)"] = ", ".join(
            f"{k}: {v:.2f}" for k, v in gh["shift_norm_by_transition"].items())
    if "svd_rank1_share" in gh:
        kv[f"{g}: SVD of prompt-state differences, rank-1 / rank-2 share"] = (
            f"{gh['svd_rank1_share']:.2f} / {gh['svd_rank2_share']:.2f}")
    if "lexicon_first" in gh:
        lf = gh["lexicon_first"]
        kv[f"{g}: logit-lens relation 1→2 (toxic Σ, non-toxic Σ, mean gap)"] = (
            f"{lf['toxic_weighted']:+.3f}, {lf['nontoxic_weighted']:+.3f}, {lf['gap']:+.4f}")
    return kv


def _headline_kv(cfg, h: dict, groups: list[str]) -> dict[str, object]:
    """The headline table of the report."""
    sizes = ", ".join(f"{g}: {h[g]['n']}" for g in groups)
    kv: dict[str, object] = {"samples": f"{h['n']} ({sizes}; design: {h.get('design', 'paper')})",
                             "rounds": cfg.rounds, "decoding": f"{cfg.sampling}, up to {cfg.max_new_tokens} new tokens, seed {cfg.seed}",
                             "time": f"generation {h.get('generation_seconds', '?')} s (all rounds); "
                                     f"this call {h.get('seconds_this_call', '?')} s"}
    for g in groups:
        kv.update(_group_kv(g, h[g]))
    for name in h.get("contrasts", []):
        ct = h[name]
        cs, rc, rs = ct["first_shift_cos_by_layer"], ct["first_shift_random_cos"], ct["first_shift_random_std"]
        best = int(np.argmax(np.abs(cs)))
        kv[f"contrast {name} 1→2: cosine with s_l, last layer"] = (
            f"{cs[-1]:+.3f} (random control {rc[-1]:+.3f} ± {rs[-1]:.3f}); largest |cosine| {cs[best]:+.3f} "
            f"at layer {best}")
    for name in [*groups, *h.get("contrasts", [])]:
        for key, b in h[name].get("best_layer", {}).items():
            kv[f"{name}: best layer 1→2, {key}"] = (f"layer {b['best_layer']}: {b['value']:+.3f}, "
                                                   f"max-over-layers p = {b['p_max_over_layers']:.3f}")
    kv["lexicon"] = h.get("lexicon", "")
    st = h.get("steering", {})
    kv["steering vectors"] = (f"{st.get('pairs')} pairs from {st.get('from')}, positions {st.get('positions')}, "
                              f"unit norm; mean score toxic {st.get('toxic_mean_score', float('nan')):.2f} vs "
                              f"non-toxic {st.get('nontoxic_mean_score', float('nan')):.2f}; null: {st.get('null')}")
    return kv


def _examples(page, result, groups: list[str], R: int) -> None:
    samples = result.samples
    page.heading("Examples")
    by_round = result.rows_by_round
    for g in groups:
        idx = [s["sample"] for s in samples if s["group"] == g][:3]
        for i in idx:
            lines = [f"prompt (toxicity {samples[i]['prompt_toxicity']:.2f}): {samples[i]['prompt']}"]
            for r in range(R):
                row = by_round[r][i]
                lines.append(f"round {r + 1} (toxicity {row['toxicity']:.2f}"
                             f"{'' if row['marker_found'] else ', no Completion: marker'}): {row['completion']}")
            page.pre("\n".join(lines), summary=f"{g} sample {i}: {samples[i]['prompt'][:70]}")
    page.paragraph("Full replies: results.jsonl. Per-sample toxicity: tables/samples.csv. States: states/*.npz. "
                   "Steering vectors: steering_vector.safetensors.", note=True)


def _steering_section(page, cfg, paths, tables) -> None:
    """The steering-vector section of the report."""
    page.heading("Steering vectors and the round shift")
    page.paragraph("At each layer l: P = mean over samples of (resid_post at the last prompt token in round r+1 "
                   "minus round r); s_l = unit steering vector (mean non-toxic minus toxic prompt activation at "
                   "layer l). Positive cosine: the shift points towards non-toxic. Controls: the cosine of P with "
                   f"{cfg.n_controls} random Gaussian and {cfg.n_controls} coordinate-permuted versions of s_l.")
    page.figure(paths["cos"], "Top: cosine of the mean shift with s_l per layer, one line per transition; shaded: "
                "controls for the first transition. Bottom: λ = <P, s_l>/<s_l, s_l>. The last column (when both "
                "groups ran) is the detox group's mean shift minus the toxify group's: what is specific to "
                "the instruction's direction.")
    page.figure(paths["paper"], "The paper's statistic (its public code: mean over samples of the cosine of each "
                "sample's shift of the final-norm response mean with the layer's vector), and the same with the "
                "layer's own resid_post response mean; shaded: 95% bootstrap CI over prompts; grey: "
                f"{cfg.n_null} label-shuffled steering vectors (mean ± 2 std).")
    if (tables / "steering_best_layer.csv").is_file():
        page.table_csv(tables / "steering_best_layer.csv", caption="Best layer = largest |statistic|; "
                       "p_max_over_layers compares that maximum with the maximum over layers under each "
                       "label-shuffled vector (corrects for picking the best of all layers).")
    page.table_csv(tables / "steering_cosine.csv", max_rows=80)


def write_report(run_path: Path, cfg, model, result) -> Path:
    """Write the figures and ``report.html`` of a finished run."""
    figs = run_path / "figures"
    tables = run_path / "tables"
    h = result.headline
    groups = h.get("groups") or [g for g in ("detox", "toxify") if g in h]
    samples = result.samples
    R = cfg.rounds
    paths = {"tox": toxicity_figure(figs / "toxicity_per_round.png", result, R, groups),
             "pca": pca_figure(figs / "pca_arrows.png", result, groups, samples),
             "pca3d": pca3d_figure(figs / "pca_3d.png", result, groups, samples),
             "cos": cosine_figure(figs / "steering_cosine.png", result, groups),
             "paper": paper_stat_figure(figs / "steering_paper_stat.png", result)}
    if result.arm_differences:
        paths["arms"] = arms_figure(figs / "arms_toxicity.png", result, groups)
    if result.lexicon:
        paths["lex"] = lexicon_figure(figs / "lexicon_relation.png", result, groups)
    if result.vector_lexicon:
        paths["veclex"] = vector_lexicon_figure(figs / "vector_lexicon.png", result)

    page = HtmlReport("Intrinsic self-correction study",
                      f"{model.name} ({model.fingerprint}) · {time.strftime('%Y-%m-%d %H:%M')} · method of "
                      f"arXiv 2505.11924 (METHODS.md section 1)", base_dir=run_path)
    page.heading("Headline")
    page.kv(_headline_kv(cfg, h, groups))

    page.heading("Toxicity per round (Figure 1, Table 1)")
    page.figure(paths["tox"], "Mean toxicity of the parsed completion per round; error bars: one standard deviation. "
                "'Moved as instructed': toxicity moved in the instructed direction in at least "
                f"ceil({cfg.moved_share}·(R−1)) transitions (relative threshold {cfg.moved_rel}·(|t_r|+|t_r+1|)).")
    page.table_csv(tables / "toxicity_per_round.csv", caption="lo, hi: 95% bootstrap CI of the mean over prompts.")
    if result.arm_differences:
        page.heading("Instructions compared on the same prompts (crossed design)")
        page.figure(paths["arms"], "Every prompt got every instruction (arms); round 1 is the same dialogue in "
                    "every arm, so the arms differ from round 2 on.")
        page.table_csv(tables / "arm_differences.csv", caption="diff = mean toxicity of arm minus that of 'minus' on "
                       "the same prompts; lo, hi: paired bootstrap 95% CI over prompts; p_not_lower: share of "
                       "resamples with diff >= 0.")

    page.heading("Hidden-state moves (Figure 2)")
    page.figure(paths["pca"], "PCA (3 components, fitted on the states of all rounds and both groups) of the "
                "final-norm state; each arrow is one sample's move from round r to r+1; dots are round 1.")
    page.figure(paths["pca3d"], "The same PCA in three components (response state): dots are round 1, arrows "
                "each sample's round-to-round moves.")
    page.table_csv(tables / "svd.csv", caption="Share of the differences' squared norm in the top 1 / top 2 "
                   "singular directions; v1_mean_cos = |cos| of the first direction with the mean difference.")

    _steering_section(page, cfg, paths, tables)

    page.heading("Logit-lens relation (Table 2)")
    if result.lexicon:
        page.figure(paths["lex"], f"s_r = mean_i U D_i,r over the vocabulary (D: prompt-state differences). Top: "
                    f"sums of s_r[v]·tox_v over the {cfg.lexicon_k} most and least toxic lexicon tokens (the paper's "
                    "Table 2). Bottom: each set's mean shift minus the vocabulary's mean shift; positive = the "
                    "set is promoted relative to the average token.")
        page.table_csv(tables / "lexicon_relation.csv")
        if result.vector_lexicon:
            page.figure(paths["veclex"], "Each layer's unit steering vector through the unembedding (U s_l): does it "
                        "demote the most toxic tokens and promote the least toxic ones?")
    else:
        page.paragraph(f"Skipped: {h.get('lexicon', '')}", note=True)

    _examples(page, result, groups, R)
    return page.write(run_path / "report.html")
