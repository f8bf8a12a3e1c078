"""Instruction-tuning behaviour shift (Wu et al., arXiv 2310.00492; METHODS.md 2): attribution,
attention-head word pairs and FFN concepts on a base and a tuned model, compared.

Results are words and scores, so the comparison works across tokenizers; layers are compared by
relative depth (``n_groups`` layer groups, 4 by default, the paper's 8 with :meth:`ShiftConfig.paper`).
See ``docs/instruction_shift.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EmptyInputError
from ..explain import head_verbs
from ..explain.head_verbs import INSTRUCTION_VERBS, N_GROUPS
from ..models.model import Model
from ..runs import write_csv, write_json
from ..validate import redact_url


@dataclass
class ShiftConfig:
    """Settings of one comparison (written to ``config.json``). ``n_pcs`` FFN components per layer and
    ``n_groups`` layer groups; the paper's values are 300 and 8 (:meth:`paper`). ``label_seeds``
    labelling runs per component (the paper: 5)."""

    data: str = "example"
    layers: list[int] | None = None
    n_words: int = 3000
    n_frequent: int = 3000
    n_background: int = 3000
    similarity: str = "embeddings"
    head_k: int = 100
    n_pcs: int = 10
    n_groups: int = 4
    ffn_k: int = 50
    label_seeds: int = 1
    generate: bool = False
    raw: bool = False
    max_new_tokens: int = 32
    labeller: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def paper(cls, **kw) -> ShiftConfig:
        """The paper's sizes: 300 FFN components per layer, 8 layer groups, 5 labelling seeds."""
        return cls(**{"n_pcs": 300, "n_groups": 8, "label_seeds": 5, **kw})


def layer_group(layer: int, n_layers: int, n_groups: int = N_GROUPS) -> str:
    return head_verbs.layer_group(layer, n_layers, n_groups)


def verb_table(base_heads, tuned_heads, base: Model, tuned: Model, n_groups: int = N_GROUPS,
               n_background: int = 3000) -> tuple[list[dict], dict]:
    """The paper's head-verb statistic per layer group and verb (:func:`~steerlab.explain.head_verbs.verb_shares`)
    and its per-group two-sided Welch tests, instruction verbs vs background verbs."""
    background = head_verbs.background_verbs(n_background)
    rows, matched = head_verbs.verb_shares(base_heads, tuned_heads, base.n_layers, tuned.n_layers,
                                           INSTRUCTION_VERBS, background, n_groups)
    try:
        tests = head_verbs.verb_tests(rows)
    except EmptyInputError as e:
        tests = {"all": {"error": str(e)}}
    return rows, {g: {**t, "heads_matched": matched} for g, t in tests.items()}


def ffn_rows(layers, role: str, n_layers: int, n_groups: int = N_GROUPS) -> list[dict]:
    """One row per component; with several labelling runs, the agreement of each label too."""
    rows = []
    for fl in layers:
        for r, ws in enumerate(fl.words):
            lab = fl.labels[r] if r < len(fl.labels) else {}
            rows.append({"model": role, "layer": fl.layer, "layer_group": layer_group(fl.layer, n_layers, n_groups),
                         "pc": r, "evr": float(fl.evr[r]), "level": lab.get("level", ""), "task": lab.get("task", ""),
                         "level_agreement": lab.get("level_agreement", ""), "task_agreement": lab.get("task_agreement", ""),
                         "top_words": " ".join(ws[:20])})
    return rows


def concept_table(rows: Sequence[dict]) -> list[dict]:
    """Share of labelled components per (model, layer group, level/task label), "cannot tell"
    included, with the mean agreement of the runs behind each label when there were several."""
    out = []
    keys = sorted({(r["model"], r["layer_group"]) for r in rows if r["level"]})
    for model, g in keys:
        sub = [r for r in rows if r["model"] == model and r["layer_group"] == g and r["level"]]
        for kind in ("level", "task"):
            for lab in sorted({r[kind] for r in sub}):
                hit = [r for r in sub if r[kind] == lab]
                agree = [float(r[f"{kind}_agreement"]) for r in hit if r.get(f"{kind}_agreement", "") != ""]
                out.append({"model": model, "layer_group": g, "kind": kind, "label": lab,
                            "share": len(hit) / len(sub), "mean_agreement": float(np.mean(agree)) if agree else ""})
    return out


def overlap_table(base_layers, tuned_layers, base: Model, tuned: Model, n_groups: int = N_GROUPS) -> list[dict]:
    """Per layer group: Jaccard overlap of the sets of top words of all components of the two models."""
    def words(layers, n):
        by: dict[str, set] = {}
        for fl in layers:
            by.setdefault(layer_group(fl.layer, n, n_groups), set()).update(w.lower() for ws in fl.words for w in ws)
        return by

    b, t = words(base_layers, base.n_layers), words(tuned_layers, tuned.n_layers)
    return [{"layer_group": g, "base_words": len(b[g]), "tuned_words": len(t[g]), "shared": len(b[g] & t[g]),
             "jaccard": len(b[g] & t[g]) / max(1, len(b[g] | t[g]))}
            for g in sorted(set(b) & set(t), key=lambda s: int(s.split("-")[0]))]


def head_rows(heads, role: str, top: int = 20) -> list[dict]:
    return [{"model": role, "layer": hp.layer, "head": h, "rank": i, "pair": f"{k}={q}", "similarity": s,
             "dimension": r, "similarity_source": hp.similarity}
            for hp in heads for h, pairs in enumerate(hp.pairs) for i, (k, q, s, r) in enumerate(pairs[:top])]


def analyse_model(model: Model, role: str, items, cfg: ShiftConfig, labeller=None) -> dict:
    """The three explanations of one model, with their timings."""
    from ..explain.attribution_study import score_items
    from ..explain.ffn import explain_ffn, label_layers
    from ..explain.heads import explain_heads

    t0 = time.perf_counter()
    words = head_verbs.head_vocabulary(cfg.n_words, INSTRUCTION_VERBS + tuple(head_verbs.background_verbs(cfg.n_background)))
    heads = explain_heads(model, cfg.layers, k=cfg.head_k, n_frequent=min(cfg.n_frequent, cfg.n_words),
                          similarity=cfg.similarity, words=words)
    t1 = time.perf_counter()
    ffn = explain_ffn(model, cfg.layers, k=cfg.ffn_k, n_components=cfg.n_pcs)
    if labeller is not None:
        label_layers(ffn, labeller, cfg.n_pcs, seeds=cfg.label_seeds)
    t2 = time.perf_counter()
    scores = score_items(model, items, generate=cfg.generate, max_new_tokens=cfg.max_new_tokens,
                         chat=False if cfg.raw else None)
    for r in scores:
        r["model"] = role
    t3 = time.perf_counter()
    return {"heads": heads, "ffn": ffn, "scores": scores,
            "seconds": {"heads": t1 - t0, "ffn": t2 - t1, "attribution": t3 - t2}}


def run_instruction_shift(base: Model, tuned: Model, out: str | Path, cfg: ShiftConfig | None = None,
                          labeller=None) -> dict:
    """Run everything on both models and write ``tables/``, ``figures/``, ``summary.json`` and
    ``report.html`` under ``out``. Returns the summary."""
    from ..explain.attribution_study import base_vs_tuned, followed_vs_unfollowed, load_annotated
    from .instruction_shift_report import write_report

    cfg = cfg or ShiftConfig()
    out = Path(out)
    items = load_annotated(cfg.data)
    res = {role: analyse_model(m, role, items, cfg, labeller) for role, m in (("base", base), ("tuned", tuned))}
    tables = out / "tables"
    verbs, verb_test = verb_table(res["base"]["heads"], res["tuned"]["heads"], base, tuned, cfg.n_groups,
                                  cfg.n_background)
    write_csv(tables / "head_verbs.csv", verbs)
    write_csv(tables / "head_pairs.csv", head_rows(res["base"]["heads"], "base")
              + head_rows(res["tuned"]["heads"], "tuned"))
    ffn = (ffn_rows(res["base"]["ffn"], "base", base.n_layers, cfg.n_groups)
           + ffn_rows(res["tuned"]["ffn"], "tuned", tuned.n_layers, cfg.n_groups))
    write_csv(tables / "ffn_components.csv", ffn)
    concepts = concept_table(ffn) if labeller is not None else []
    overlap = overlap_table(res["base"]["ffn"], res["tuned"]["ffn"], base, tuned, cfg.n_groups)
    write_csv(tables / ("ffn_concepts.csv" if concepts else "ffn_overlap.csv"), concepts or overlap)
    scores = res["base"]["scores"] + res["tuned"]["scores"]
    write_csv(tables / "instruction_scores.csv", scores)
    tests = {f"verbs {g}": t for g, t in verb_test.items()}
    for key, suffix in (("score", ""), ("score_without_prompt_max", " (raw density, not the paper's)")):
        tests["base_vs_tuned" + suffix] = base_vs_tuned(res["base"]["scores"], res["tuned"]["scores"], key)
        for role in ("base", "tuned"):
            if any(r.get("followed") is not None for r in res[role]["scores"]):
                tests[f"followed_vs_unfollowed_{role}{suffix}"] = followed_vs_unfollowed(res[role]["scores"], key)
    shown = redact_url(cfg.labeller) if "://" in cfg.labeller else cfg.labeller  # a URL may carry user:password@
    summary = {"config": {**asdict(cfg), "labeller": shown}, "base": base.name, "tuned": tuned.name, "tests": tests,
               "seconds": {role: res[role]["seconds"] for role in res},
               "same_family": base.arch.name == tuned.arch.name and base.vocab_size == tuned.vocab_size}
    write_json(out / "summary.json", summary)
    write_report(out, summary, verbs, concepts, overlap, scores)
    return summary
