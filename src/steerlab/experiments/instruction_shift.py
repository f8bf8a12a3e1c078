"""Instruction-tuning behaviour shift (Wu et al., arXiv 2310.00492; METHODS.md 2): attribution,
attention-head word pairs and FFN concepts on a base and a tuned model, compared.

Results are words and scores, so the comparison works across tokenizers; layers are compared by
relative depth (four layer groups). See ``docs/instruction_shift.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..models.model import Model
from ..runs import write_csv, write_json
from ..validate import redact_url

INSTRUCTION_VERBS = ("write", "give", "list", "explain", "describe", "summarize", "translate", "answer",
                     "tell", "create", "generate", "classify", "identify", "provide", "name", "find",
                     "rewrite", "suggest", "compare", "choose")
FREQUENT_VERBS = ("be", "have", "do", "say", "get", "go", "know", "see", "come", "think", "look", "want",
                  "take", "use", "work", "seem", "feel", "try", "leave", "call")
N_GROUPS = 4


@dataclass
class ShiftConfig:
    """Settings of one comparison (written to ``config.json``)."""

    data: str = "example"
    layers: list[int] | None = None
    n_words: int = 3000
    n_frequent: int = 3000
    similarity: str = "embeddings"
    head_k: int = 100
    n_pcs: int = 10
    ffn_k: int = 50
    generate: bool = False
    raw: bool = False
    max_new_tokens: int = 32
    labeller: str = ""
    extra: dict = field(default_factory=dict)


def layer_group(layer: int, n_layers: int) -> str:
    g = min(N_GROUPS - 1, layer * N_GROUPS // n_layers)
    return f"{100 * g // N_GROUPS}-{100 * (g + 1) // N_GROUPS}%"


def verb_counts(heads, n_layers: int, verbs: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean occurrences per head of each verb in the head pairs (as key or query), per layer group."""
    by: dict[str, list[dict[str, int]]] = {}
    for hp in heads:
        g = layer_group(hp.layer, n_layers)
        for pairs in hp.pairs:
            words = [w for k, q, _, _ in pairs for w in (k, q)]
            by.setdefault(g, []).append({v: words.count(v) for v in verbs})
    return {g: {v: float(np.mean([c[v] for c in rows])) for v in verbs} for g, rows in by.items()}


def verb_table(base_heads, tuned_heads, base: Model, tuned: Model) -> tuple[list[dict], dict]:
    """Per layer group and verb: mean occurrences per head in each model and the difference; a Welch
    test that instruction verbs gain more than frequent verbs."""
    from ..explain.attribution_study import welch

    verbs = INSTRUCTION_VERBS + FREQUENT_VERBS
    b, t = verb_counts(base_heads, base.n_layers, verbs), verb_counts(tuned_heads, tuned.n_layers, verbs)
    rows = []
    for g in sorted(set(b) & set(t), key=lambda s: int(s.split("-")[0])):
        for v in verbs:
            rows.append({"layer_group": g, "verb": v, "kind": "instruction" if v in INSTRUCTION_VERBS else "frequent",
                         "base": b[g][v], "tuned": t[g][v], "diff": t[g][v] - b[g][v]})
    inst = [r["diff"] for r in rows if r["kind"] == "instruction"]
    freq = [r["diff"] for r in rows if r["kind"] == "frequent"]
    try:
        test = welch(inst, freq, "instruction verbs (tuned - base)", "frequent verbs (tuned - base)")
    except ValueError as e:
        test = {"error": str(e)}
    return rows, test


def ffn_rows(layers, role: str, n_layers: int) -> list[dict]:
    rows = []
    for fl in layers:
        for r, ws in enumerate(fl.words):
            lab = fl.labels[r] if r < len(fl.labels) else {}
            rows.append({"model": role, "layer": fl.layer, "layer_group": layer_group(fl.layer, n_layers), "pc": r,
                         "evr": float(fl.evr[r]), "level": lab.get("level", ""), "task": lab.get("task", ""),
                         "top_words": " ".join(ws[:20])})
    return rows


def concept_table(rows: Sequence[dict]) -> list[dict]:
    """Share of labelled components per (model, layer group, level/task label)."""
    out = []
    keys = sorted({(r["model"], r["layer_group"]) for r in rows if r["level"]})
    for model, g in keys:
        sub = [r for r in rows if r["model"] == model and r["layer_group"] == g and r["level"]]
        for kind in ("level", "task"):
            for lab in sorted({r[kind] for r in sub}):
                out.append({"model": model, "layer_group": g, "kind": kind, "label": lab,
                            "share": sum(r[kind] == lab for r in sub) / len(sub)})
    return out


def overlap_table(base_layers, tuned_layers, base: Model, tuned: Model) -> list[dict]:
    """Per layer group: Jaccard overlap of the sets of top words of all components of the two models."""
    def words(layers, n):
        by: dict[str, set] = {}
        for fl in layers:
            by.setdefault(layer_group(fl.layer, n), set()).update(w.lower() for ws in fl.words for w in ws)
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
    heads = explain_heads(model, cfg.layers, n_words=cfg.n_words, k=cfg.head_k, n_frequent=cfg.n_frequent,
                          similarity=cfg.similarity)
    t1 = time.perf_counter()
    ffn = explain_ffn(model, cfg.layers, k=cfg.ffn_k, n_components=cfg.n_pcs)
    if labeller is not None:
        label_layers(ffn, labeller, cfg.n_pcs)
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
    verbs, verb_test = verb_table(res["base"]["heads"], res["tuned"]["heads"], base, tuned)
    write_csv(tables / "head_verbs.csv", verbs)
    write_csv(tables / "head_pairs.csv", head_rows(res["base"]["heads"], "base")
              + head_rows(res["tuned"]["heads"], "tuned"))
    ffn = ffn_rows(res["base"]["ffn"], "base", base.n_layers) + ffn_rows(res["tuned"]["ffn"], "tuned", tuned.n_layers)
    write_csv(tables / "ffn_components.csv", ffn)
    concepts = concept_table(ffn) if labeller is not None else []
    overlap = overlap_table(res["base"]["ffn"], res["tuned"]["ffn"], base, tuned)
    write_csv(tables / ("ffn_concepts.csv" if concepts else "ffn_overlap.csv"), concepts or overlap)
    scores = res["base"]["scores"] + res["tuned"]["scores"]
    write_csv(tables / "instruction_scores.csv", scores)
    tests = {"verbs": verb_test}
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
