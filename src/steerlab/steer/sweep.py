"""Layer x strength sweeps of a steering vector: one batched generate per chunk of rows, each row
with its own strength (``alpha`` as a ``[batch]`` tensor), scored, resumable, drawn as a heat map.
Any apply mode (``add``, ``gated``, ``ablate``, ``clamp``) and schedule can be swept, one site or a
group of sites edited together per row of the table, with optional side effects on neutral text
(perplexity and KL from the unedited model) per cell."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EmptyInputError
from ..evaluation import admissible
from ..generation import GenConfig, derive_seed, generate_batch, plan_batches, prompt_ids_texts, token_lengths
from ..hooks import capture
from ..models.model import Model
from ..runs import RunDir
from ..scoring.registry import scorer_identity
from ..validate import number
from .vector import APPLY_MODES, SteeringVector

RELATIVE_MODES = ("add", "gated")
"""Modes whose strength is in units of the site's typical norm (with ``relative=True``); the others
(``ablate``: share of the component removed, ``clamp``: level between the fitted projection means)
take ``alpha`` as it is."""


def cell_intervention(vector: SteeringVector, sites: Sequence[str], scale: dict[str, float], alpha,
                      mode: str = "add", where: str = "all", normalise: bool = True) -> tuple[SteeringVector, dict]:
    """The intervention and apply options of one sweep cell: ``vector``'s unit directions (as they
    are with ``normalise=False``) at ``sites``, each times ``scale[site] / scale[sites[0]]`` (so
    several sites share one ``alpha``), and the options ``{"alpha": alpha * scale[sites[0]],
    "where", "mode"}``. A single site gives ``unit`` applied at ``alpha * scale`` exactly."""
    APPLY_MODES.check(mode)
    first = scale[sites[0]]
    dirs = {s: vector.directions[s] / vector.directions[s].norm().clamp_min(1e-12) if normalise
            else vector.directions[s] for s in sites}
    if len(sites) > 1:
        dirs = {s: d * (scale[s] / first) for s, d in dirs.items()}
    return SteeringVector(dirs, dict(vector.meta)), {"alpha": alpha * first, "where": where, "mode": mode}


def typical_norms(model: Model, texts: Sequence[str], sites: Sequence[str], chat: bool = False) -> dict[str, float]:
    """Median norm of each site's activation at the last token: the scale for relative strengths."""
    caps = capture(model, list(texts), list(sites), "last", chat=chat)
    return {s: float(caps[s].norm(dim=-1).median()) for s in sites}


@dataclass
class SweepResult:
    """Mean toxicity and fluency per (site, alpha); ``rows`` holds every scored continuation."""

    sites: list[str]
    alphas: list[float]
    scale: dict[str, float]  # alpha -> added norm multiplier per site (1.0 when absolute)
    toxicity: np.ndarray  # [n_sites, n_alphas] mean toxicity
    perplexity: np.ndarray  # [n_sites, n_alphas] perplexity under the unedited model (NaN if not computed)
    baseline_toxicity: float
    baseline_perplexity: float
    rows: list[dict]
    distinct2: np.ndarray | None = None  # [n_sites, n_alphas] distinct-2 of each cell's continuations
    baseline_distinct2: float = float("nan")
    mode: str = "add"
    where: str = "all"
    groups: dict[str, list[str]] | None = None  # row label -> the sites edited together
    kl: np.ndarray | None = None  # [n_sites, n_alphas] KL(unedited || edited) on neutral text (nats)
    neutral_perplexity: np.ndarray | None = None  # [n_sites, n_alphas] neutral text under the edit

    def admissible(self, max_ppl_ratio: float | None = 2.0, min_distinct_ratio: float | None = 0.8,
                   sign: int | None = None, max_kl: float | None = None) -> np.ndarray:
        """Bool ``[n_sites, n_alphas]``: the cells the declared selection rule allows: strength of
        ``sign`` (nonzero), perplexity at most ``max_ppl_ratio`` x the unsteered one, distinct-2
        at least ``min_distinct_ratio`` x the unsteered one (degenerate, repetitive text is out
        even when a fluency model likes it) and neutral-text KL at most ``max_kl`` nats."""
        a = np.array(self.alphas)[None, :]
        keep = np.broadcast_to((a != 0) if sign is None else (np.sign(a) == sign), self.toxicity.shape).copy()
        if max_kl is not None and self.kl is None:
            raise EmptyInputError("a KL limit needs side effects: run the sweep with neutral=(reference, texts)")
        return keep & admissible(self.perplexity, self.distinct2, self.baseline_perplexity, self.baseline_distinct2,
                                 max_ppl_ratio, min_distinct_ratio, self.kl, max_kl)

    def ranked(self, lower: bool = True, **rule) -> list[tuple[str, float]]:
        """Admissible cells from the least to the most toxic (``lower``) or the reverse."""
        keep = self.admissible(**rule)
        cells = [(float(self.toxicity[i, j]), self.sites[i], self.alphas[j]) for i, j in zip(*np.nonzero(keep))]
        cells.sort(key=lambda c: c[0] if lower else -c[0])
        return [(s, a) for _, s, a in cells]

    def best(self, lower: bool = True, max_ppl_ratio: float | None = 2.0, sign: int | None = None,
             min_distinct_ratio: float | None = None, max_kl: float | None = None) -> tuple[str, float]:
        """(site, alpha) with the lowest (or highest) mean toxicity among the cells
        :meth:`admissible` allows; ``sign`` (+1 / -1) keeps only strengths of that sign (a study of a
        detoxifying direction looks at positive strengths only)."""
        keep = self.admissible(max_ppl_ratio, min_distinct_ratio, sign, max_kl)
        tox = np.where(keep, self.toxicity, np.nan)
        if np.all(np.isnan(tox)):
            raise EmptyInputError("no sweep cell satisfies the constraints (strength sign, fluency); "
                                  "widen the strengths or raise max_ppl_ratio")
        i, j = np.unravel_index(np.nanargmin(tox) if lower else np.nanargmax(tox), tox.shape)
        return self.sites[i], self.alphas[j]

    def heatmap(self, path: str | Path, title: str = "Steering sweep") -> Path:
        """Two panels: mean toxicity and perplexity per layer x strength, values annotated."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(self.alphas) * 2, 1.5 + 0.45 * len(self.sites)),
                                 constrained_layout=True)
        panels = [(self.toxicity, f"mean toxicity (baseline {self.baseline_toxicity:.3f})", "RdYlGn_r"),
                  (self.perplexity, f"perplexity (baseline {self.baseline_perplexity:.1f})", "viridis")]
        from matplotlib.colors import LogNorm

        for ax, (z, name, cmap) in zip(axes, panels):
            finite = z[np.isfinite(z)]
            log = z is self.perplexity and finite.size and finite.min() > 0
            norm = LogNorm(finite.min(), finite.max()) if log else None
            im = ax.imshow(z, aspect="auto", cmap=cmap, norm=norm)
            ax.set_xticks(range(len(self.alphas)), [f"{a:g}" for a in self.alphas])
            ax.set_yticks(range(len(self.sites)), [s.replace(".resid_post", "") for s in self.sites])
            ax.set_xlabel("strength alpha" + (" (x typical residual norm)" if any(v != 1 for v in self.scale.values())
                                               else ""))
            ax.set_ylabel("steered site")
            ax.set_title(name)
            for (r, c), v in np.ndenumerate(z):
                if np.isfinite(v):
                    rgb = im.cmap(im.norm(v))[:3]
                    dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                    ax.text(c, r, f"{v:.2f}" if z is self.toxicity else f"{v:.0f}", ha="center", va="center",
                            fontsize=8, color="white" if dark else "black")
            fig.colorbar(im, ax=ax, shrink=0.8, label=name.split(" (")[0] + (" (log scale)" if log else ""))
        fig.suptitle(title)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def sweep(model: Model, vector: SteeringVector, prompts: Sequence, alphas: Sequence[float], scorer,
          out_dir: str | Path, cfg: GenConfig | None = None, where: str = "all", relative: bool = True,
          fluency: bool = True, overwrite: bool = False, progress: bool | None = None, mode: str = "add",
          groups: dict[str, Sequence[str]] | None = None, neutral: tuple | None = None) -> SweepResult:
    """Generate with each site of ``vector`` edited in turn (or each group of ``groups``, label ->
    sites edited together), for every alpha, score the continuations and summarise.

    ``mode`` is the apply mode (:data:`steerlab.steer.vector.APPLY_MODES`). With ``relative=True``
    the strength of ``add`` and ``gated`` is in units of the site's typical norm:
    ``alpha * typical_norm(site) * unit direction`` (comparable across layers whose residual norms
    differ by 10x or more; a group gives each site its own norm); ``ablate`` and ``clamp`` take
    ``alpha`` as it is. Rows of all strengths share batched generate calls (per-row strength);
    alpha 0 (the unsteered baseline) is generated once. Rows are appended to
    ``out_dir/results.jsonl`` and a rerun resumes. ``neutral=(reference, texts)``
    (:func:`steerlab.evaluation.neutral_reference`) adds each cell's side effects on neutral text,
    measured under the cell's :meth:`~steerlab.steer.vector.SteeringVector.fixed_text_options` (every
    position: a plain forward has no generated positions, so a ``generated`` schedule would show
    none) and cached in record.json.
    """
    cfg = cfg or GenConfig()
    alphas = [number(a, f"sweep strength {i}") for i, a in enumerate(alphas)]
    if not alphas:
        raise EmptyInputError("sweep needs at least one strength")
    APPLY_MODES.check(mode)
    ids, texts = prompt_ids_texts(prompts)
    groups = {k: list(v) for k, v in (groups or {s: [s] for s in vector.directions}).items()}
    vector.only(sorted({s for g in groups.values() for s in g}))  # every grouped site is in the vector
    vector.check(model)
    sites = sorted({s for g in groups.values() for s in g}, key=list(vector.directions).index)
    rel = relative and mode in RELATIVE_MODES
    scale = typical_norms(model, texts, sites, chat=cfg.chat) if rel else {s: 1.0 for s in sites}
    unit = {s: v / v.norm().clamp_min(1e-12) if relative else v for s, v in vector.directions.items()}
    unit_vec = SteeringVector(unit, vector.meta)
    config = {"kind": "sweep", "model_fingerprint": model.fingerprint, **asdict(cfg), "where": where,
              "relative": relative, "alphas": alphas, "sites": list(groups), **scorer_identity(scorer),
              "vector_data": vector.meta.get("data_fingerprint"), "vector": vector.fingerprint(), "prompts": ids,
              **({"mode": mode, "groups": groups} if mode != "add" or any(len(g) > 1 for g in groups.values()) else {})}

    def work(chunk, seed: int) -> list[dict]:
        label = chunk[0][0]
        chunk_texts, keys = [texts[i] for _, _, i in chunk], [ids[i] for _, _, i in chunk]
        if label == "none":
            conts = generate_batch(model, chunk_texts, cfg, keys)
        else:  # the same random numbers per (prompt, sample) in every cell: paired comparisons
            a = torch.tensor([al for _, al, _ in chunk], dtype=torch.float64).repeat_interleave(cfg.k)
            iv, opts = cell_intervention(unit_vec, groups[label], scale, a, mode, where, normalise=False)
            with iv.apply(model, **opts):
                conts = generate_batch(model, chunk_texts, cfg, keys)
        rows = [{"site": label, "alpha": al, "prompt_id": ids[i], "prompt": texts[i], "sample": s, "continuation": c}
                for (_, al, i), cs in zip(chunk, conts) for s, c in enumerate(cs)]
        if rows:
            for r, t in zip(rows, scorer.toxicity([r["continuation"] for r in rows])):
                r["toxicity"] = float(t)
        return rows

    with RunDir(out_dir, config, overwrite=overwrite) as run:
        rows = run.loop(_chunks(model, ids, texts, list(groups), alphas, cfg), work,
                        keys=lambda j: [(j[0], j[1], ids[j[2]], s) for s in range(cfg.k)],
                        row_key=lambda r: (r["site"], r["alpha"], r["prompt_id"], r["sample"]),
                        seed=lambda c: derive_seed(cfg.seed, c[0][0], *[f"{a:g}:{ids[i]}" for _, a, i in c]),
                        desc="sweep", progress=progress)
        run.write_record(scale=scale)
        side = None if neutral is None else _side_effects(model, run, unit_vec, groups, alphas, scale, mode,
                                                          where, neutral, progress)
    res = _summarise(model, rows, list(groups), alphas, scale, cfg, fluency)
    res.mode, res.where, res.groups = mode, where, groups
    if side is not None:
        res.kl, res.neutral_perplexity = side
    return res


def _side_effects(model, run: RunDir, unit_vec, groups, alphas, scale, mode, where, neutral, progress):
    """``(kl, neutral perplexity)`` arrays ``[n_groups, n_alphas]``, each cell computed once (record.json)."""
    from ..evaluation import side_effects

    reference, texts = neutral
    done = dict(run.record().get("side_effects", {}))
    cells = [(g, a) for g in groups for a in alphas]
    from ..progress import progress_iter

    for g, a in progress_iter(cells, "side effects", show=progress is not False, unit="cell"):
        key = f"{g}|{a:g}"
        if key in done:
            continue
        if a == 0:
            done[key] = side_effects(model, reference, texts)
        else:
            iv, opts = cell_intervention(unit_vec, groups[g], scale, a, mode, where, normalise=False)
            with iv.apply(model, **iv.fixed_text_options(opts)):
                done[key] = side_effects(model, reference, texts)
        run.write_record(side_effects=done)
    kl = np.array([[done[f"{g}|{a:g}"]["kl_from_unedited"] for a in alphas] for g in groups])
    ppl = np.array([[done[f"{g}|{a:g}"]["neutral_perplexity"] for a in alphas] for g in groups])
    return kl, ppl


def _chunks(model, ids, texts, sites, alphas, cfg: GenConfig) -> list[list[tuple[str, float, int]]]:
    """Jobs ``(site, alpha, prompt index)`` in generate-sized chunks that never mix sites (one hook
    set per call): the unsteered baseline once (site ``none``), then every site x nonzero alpha,
    prompts in length order, strengths of one prompt side by side."""
    jobs = [("none", 0.0, i) for i in range(len(texts))]
    jobs += [(s, a, i) for s in sites for a in alphas if a != 0 for i in range(len(texts))]
    order = plan_batches(token_lengths(model, texts, cfg.chat), ids, len(texts))[0]
    rank = {i: r for r, i in enumerate(order)}
    jobs.sort(key=lambda j: (j[0] != "none", j[0], rank[j[2]], j[1]))
    per = max(1, cfg.batch_size // cfg.k)
    chunks: list[list[tuple[str, float, int]]] = []
    for j in jobs:
        if chunks and len(chunks[-1]) < per and chunks[-1][0][0] == j[0]:
            chunks[-1].append(j)
        else:
            chunks.append([j])
    return chunks


def _summarise(model, rows, sites, alphas, scale, cfg, fluency) -> SweepResult:
    from ..metrics import distinct, perplexity

    def cell(site, alpha):
        return [r for r in rows if (r["site"], r["alpha"]) == (site, alpha)]

    def d2(rs):
        return distinct([r["continuation"] for r in rs], ns=(2,))["distinct-2"]

    # every cell's continuations in one perplexity pass that forwards each prompt once
    kept = {c: [r for r in cell(*c) if r["continuation"].strip()]
            for c in [("none", 0.0)] + [(s, a) for s in sites for a in alphas if a != 0]}
    ppl: dict[tuple[str, float], float] = {}
    flat = [r for rs in kept.values() for r in rs]
    if fluency and flat:
        res = perplexity(model, [r["continuation"] for r in flat], prompts=[r["prompt"] for r in flat],
                         chat=cfg.chat, shared_prefix=True)
        start = 0
        for c, rs in kept.items():
            nll, n = res.nll[start: start + len(rs)], res.n_tokens[start: start + len(rs)]
            ppl[c] = float(np.exp(nll.sum() / n.sum())) if n.sum() else float("nan")
            start += len(rs)
    base = cell("none", 0.0)
    base_tox, base_ppl = float(np.mean([r["toxicity"] for r in base])), ppl.get(("none", 0.0), float("nan"))
    tox = np.full((len(sites), len(alphas)), np.nan)
    pp, dd = np.full_like(tox, np.nan), np.full_like(tox, np.nan)
    for i, s in enumerate(sites):
        for j, a in enumerate(alphas):
            rs = base if a == 0 else cell(s, a)
            tox[i, j] = np.mean([r["toxicity"] for r in rs])
            pp[i, j] = base_ppl if a == 0 else ppl.get((s, a), float("nan"))
            dd[i, j] = d2(rs)
    return SweepResult(sites, alphas, scale, tox, pp, base_tox, base_ppl, rows, dd, d2(base))
