"""Every table the ``steerlab`` command prints: the commands compute, these functions render."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .app import console


def table(title: str, columns, **kw) -> Table:
    """A left-titled table; ``columns`` are names or (name, justify) pairs."""
    t = Table(title=title, title_justify="left", **kw)
    for c in columns:
        name, just = (c, "left") if isinstance(c, str) else c
        t.add_column(name, justify=just)
    return t


def print_lens(lens, title: str) -> None:
    t = table(title, [("layer", "right")], show_lines=False)
    t.columns[0].style = "bold"
    for j in range(len(lens.top[0])):
        t.add_column(f"top {j + 1}")
    for name, row in zip(lens.layers, lens.top):
        t.add_row(name, *[f"{tok!r} {p:.2f}" for tok, p in row])
    console.print(t)


def print_interpretations(res, edited, title: str, label: str) -> None:
    cols = [("layer", "right"), ("token", "right"), ("token text", "left"), ("interpretation", "left"),
            ("relevancy", "right")]
    if edited is not None:
        cols += [(f"with {label.rsplit('/', 1)[-1]}", "left"), ("relevancy ", "right")]
    t = table(title, cols)
    for i, r in enumerate(res.rows):
        more = [] if edited is None else [edited.rows[i].text, f"{edited.rows[i].relevancy:.3f}"]
        t.add_row(str(r.layer), str(r.token), repr(r.token_text), r.text, f"{r.relevancy:.3f}", *more)
    console.print(t)


def print_vector_interpretations(res, title: str) -> None:
    t = table(title, ["site", "interpretation", ("relevancy", "right")])
    for r in res.rows:
        t.add_row(r.token_text, r.text, f"{r.relevancy:.3f}")
    console.print(t)


def print_models(embedded: dict, archs) -> None:
    t = Table(title="embedded models")
    t.add_column("name")
    t.add_column("what")
    for name, (_, desc) in embedded.items():
        t.add_row(name, desc)
    console.print(t)
    console.print("architectures with adapters: " + ", ".join(sorted(archs)))


def print_info(m) -> None:
    t = Table(title=m.name, show_header=False)
    for k_, v in [("source", m.source), ("fingerprint", m.fingerprint), ("architecture", m.arch.name),
                  ("layers", m.n_layers), ("d_model", m.d_model), ("heads", f"{m.n_heads} (kv {m.n_kv_heads}) x {m.d_head}"),
                  ("d_mlp", m.d_mlp), ("vocab", m.vocab_size), ("tied unembedding", m.tied()),
                  ("chat template", "yes" if m.chat_template else "no")]:
        t.add_row(k_, str(v))
    console.print(t)


def print_summary(summary: dict, title: str) -> None:
    """The metrics of a generation run; metrics undefined with one sample per prompt say so instead of a
    number; with an unsteered comparison, its paired differences (same prompts and random numbers)."""
    undefined = summary.get("undefined", {})
    t = table(title, ["metric", ("value", "right"), ("95% CI", "right")])
    for name, e in summary["toxicity"].items():
        if name in undefined:
            t.add_row(name.replace("_", " "), "undefined", "(k = 1, see below)")
        elif isinstance(e, dict):
            t.add_row(name.replace("_", " "), f"{e['value']:.3f}", f"[{e['lo']:.3f}, {e['hi']:.3f}]")
    vs = summary.get("vs_unsteered")
    for name, e in (vs or {}).get("paired_difference", {}).items():
        if isinstance(e, dict) and "value" in e and name not in undefined:
            t.add_row(f"{name.replace('_', ' ')} - unsteered (paired)", f"{e['value']:+.3f}",
                      f"[{e['lo']:+.3f}, {e['hi']:+.3f}]")
    if vs:
        t.add_row("continuations identical to unsteered", f"{vs['identical']:.3f}", "")
    for name, v in summary.get("diversity", {}).items():
        t.add_row(name, f"{v:.3f}", "")
    if "perplexity" in summary.get("fluency", {}):
        t.add_row(f"perplexity ({summary['fluency']['reference_model']})", f"{summary['fluency']['perplexity']:.2f}", "")
    console.print(t)
    for name, why in undefined.items():
        console.print(f"{name.replace('_', ' ')} is undefined: it {why}.", soft_wrap=True)


def print_examples(rows: list[dict], title: str, unsteered: list[dict] | None = None) -> None:
    """A few continuations to read (prompt, continuation, toxicity when scored), beside the unsteered
    model's continuation of the same prompt and sample when ``unsteered`` rows are given."""
    scored = all("toxicity" in r for r in rows)
    base = {(r["prompt_id"], r["sample"]): r for r in unsteered or []}
    cols = ["prompt"] + (["unsteered", ("tox.", "right")] if base else []) + ["continuation"]
    t = table(title, cols + ([("toxicity", "right")] if scored else []))
    for r in rows:
        p = r["prompt"] if isinstance(r["prompt"], str) else str(r["prompt"])
        b = base.get((r["prompt_id"], r["sample"]), {})
        before = [escape(b.get("continuation", "")), f"{b['toxicity']:.3f}" if "toxicity" in b else ""] if base else []
        t.add_row(escape(p), *before, escape(r["continuation"]), *([f"{r['toxicity']:.3f}"] if scored else []))
    console.print(t)


def print_scores(res: dict, title: str) -> None:
    import numpy as np

    t = table(title, ["attribute", ("mean", "right"), ("share >= 0.5", "right"), ("max", "right")])
    for a, v in res.items():
        t.add_row(a, f"{np.mean(v):.3f}", f"{np.mean(v >= 0.5):.3f}", f"{np.max(v):.3f}")
    console.print(t)


def print_rows(title: str, columns, rows, **kw) -> None:
    """A table of plain rows (each a sequence of strings)."""
    t = Table(title=title, **kw)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def print_steering_test(metrics: dict, name: str) -> None:
    """The held-out test table of `steer study`."""
    ch = metrics["chosen"]
    head = "no setting chosen" if ch["site"] is None else (f"{ch['variant']} at {ch['site']}, alpha {ch['alpha']:g} "
                                                          f"x {ch['typical_norm']:.0f}")
    t = table(f"{name}: held-out test ({metrics['n_test_prompts']} prompts x {metrics['k']}), {head}",
              ["intervention", "mean toxicity [95% CI]", "expected max tox.", "tox. probability", "perplexity",
               "distinct-2", "neutral ppl", "neutral KL"])
    for arm, r in metrics["test"].items():
        tx = r["toxicity"]
        mt = tx["mean_toxicity"]
        se = r.get("side_effects", {})
        t.add_row(arm, f"{mt['value']:.3f} [{mt['lo']:.3f}, {mt['hi']:.3f}]",
                  f"{tx['expected_max_toxicity']['value']:.3f}", f"{tx['toxicity_probability']['value']:.3f}",
                  f"{r.get('fluency', {}).get('perplexity', float('nan')):.1f}", f"{r['diversity']['distinct-2']:.3f}",
                  f"{se.get('neutral_perplexity', float('nan')):.1f}", f"{se.get('kl_from_unedited', float('nan')):.3f}")
    console.print(t)


def print_selfcorrect(name: str, h: dict, rounds: int) -> None:
    """The toxicity-per-round and first-shift cosine tables of a self-correction run."""
    groups = h.get("groups") or [g for g in ("detox", "toxify") if g in h]
    t = table(f"{name}: toxicity per round, mean ± std (" + ", ".join(f"{g}: {h[g]['instruction']}" for g in groups)
              + ")", ["group", *[(f"round {r + 1}", "right") for r in range(rounds)], ("moved as instructed", "right")])
    for g in groups:
        gh = h[g]
        t.add_row(f"{g} (n={gh['n']})", *[f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(gh["toxicity_mean"], gh["toxicity_std"])],
                  str(gh["moved_as_instructed"]))
    console.print(t)
    L = len(h[groups[0]]["first_shift_cos_by_layer"])
    shown = sorted({*range(0, L, max(1, L // 6)), L - 1})
    cols = [*groups, *h.get("contrasts", [])]
    t = table("cosine of the round 1→2 shift with the layer's steering vector (resid_post, last prompt "
              "token; + = towards non-toxic); controls for the detox shift (others: tables/steering_cosine.csv)",
              [("layer", "right"), *[(g.replace("-", " − ") if g in h.get("contrasts", []) else g, "right") for g in cols],
               ("random ± std", "right"), ("permuted", "right")])
    ref = h[groups[0]]
    for layer in shown:
        t.add_row(str(layer), *[f"{h[g]['first_shift_cos_by_layer'][layer]:+.3f}" for g in cols],
                  f"{ref['first_shift_random_cos'][layer]:+.3f} ± {ref['first_shift_random_std'][layer]:.3f}",
                  f"{ref['first_shift_permuted_cos'][layer]:+.3f}")
    console.print(t)
    paper = [g for g in cols if "first_shift_paper_stat_by_layer" in h[g]]
    if paper:
        t = table("the paper's statistic: mean per-sample cosine of the round 1→2 shift of the final-norm "
                  "response mean with s_l (best layers and max-over-layers p-values: "
                  "tables/steering_best_layer.csv)", [("layer", "right"), *[(g, "right") for g in paper]])
        for layer in shown:
            t.add_row(str(layer), *[f"{h[g]['first_shift_paper_stat_by_layer'][layer]:+.3f}" for g in paper])
        console.print(t)


BENCH_COLUMNS = {"method": "method", "expected max toxicity [95% CI]": "exp. max toxicity [95% CI]",
                 "Δ mean toxicity vs unsteered (paired 95% CI)": "Δ mean tox. [paired CI]",
                 "perplexity": "ppl", "neutral KL": "neutral KL", "distinct-2": "dist-2",
                 "generation time x": "time x"}
FEW_PAIRS = ", too few for a CI)"


def print_bench(name: str, metrics: dict) -> None:
    """The benchmark's table in the terminal (numbers never cut: it fits the 130 columns of a log
    file), each method's chosen settings listed under it."""
    from ..experiments.bench_report import table_rows

    cols = BENCH_COLUMNS
    t = Table(title=f"{name}: detoxification benchmark, {metrics['n_test_prompts']} held-out prompts x "
                    f"{metrics['k']} ({metrics['preset']}); full table in report.html", title_justify="left")
    for c, short in cols.items():
        t.add_column(short, justify="left" if c == "method" else "right", no_wrap=True)
    rows, few = table_rows(metrics), False
    for r in rows:
        if r["status"] != "ok":
            t.add_row(r["method"], "failed", *[""] * (len(cols) - 2))
            continue
        cells = {c: str(r.get(c, "")) for c in cols}
        few |= FEW_PAIRS in cells["generation time x"]
        cells["generation time x"] = cells["generation time x"].replace(FEW_PAIRS, ")")
        t.add_row(*[escape(v) for v in cells.values()])
    console.print(t)
    if few:
        console.print("time x: the median ratio of paired generation timings; fewer than 3 pairs give no CI")
    for r in rows:
        what = r["note"][:200] if r["status"] != "ok" else r.get("settings", "")
        console.print(f"{r['method']}: {escape(str(what))}", soft_wrap=True)


def print_profile(profile: list[dict], top: int = 12) -> None:
    """The stage table of a run: exclusive seconds and share of the call's wall time, largest first."""
    t = table("where the time went (this call; exclusive seconds)", ["stage", ("seconds", "right"), ("share", "right")])
    for r in profile[:top]:
        t.add_row(escape(r["stage"]), f"{r['seconds']:.1f}", f"{100 * r['share']:.1f}%")
    if len(profile) > top:
        rest = profile[top:]
        t.add_row(f"{len(rest)} more stages", f"{sum(r['seconds'] for r in rest):.1f}",
                  f"{100 * sum(r['share'] for r in rest):.1f}%")
    console.print(t)


def print_attribution(att, d) -> None:
    console.print(f"response: {att.response!r} ({len(att.response_tokens)} tokens)", soft_wrap=True)
    t = table("most important prompt tokens (importance density)", [("position", "right"), "token", ("density", "right")])
    pieces = att.prompt_pieces()
    for i in d.argsort()[::-1][:15]:
        t.add_row(str(i), repr(pieces[i]), f"{d[i]:.3f}")
    console.print(t)


def print_head_pairs(res, title: str, top: int) -> None:
    t = table(title, ["layer", "head", "pairs (key=query)"])
    for hp in res:
        for h, pairs in enumerate(hp.pairs):
            t.add_row(str(hp.layer), str(h), ", ".join(f"{k}={q}" for k, q, _, _ in pairs[:top]))
    console.print(t)


def print_ffn(res, title: str) -> None:
    t = table(title, ["layer", "pc", "var. ratio", "label", "top words"])
    for fl in res:
        for r, ws in enumerate(fl.words):
            lab = fl.labels[r] if r < len(fl.labels) else {}
            label = f"{lab['level']}/{lab['task']}" if lab else ""
            if "level_agreement" in lab:
                label += f" (agreement {lab['level_agreement']:.0%}/{lab['task_agreement']:.0%} of {lab['runs']})"
            t.add_row(str(fl.layer), str(r), f"{fl.evr[r]:.3f}", label, " ".join(ws[:12]))
    console.print(t)


def print_probes(res, title: str, top: int) -> None:
    t = table(title, [(c, "right") for c in ("layer", "head", "val. accuracy", "val. AUROC",
                                             "residual accuracy (layer)")])
    for layer, h in res.top_heads(min(top, res.head_acc.numel())):
        i = res.layers.index(layer)
        racc = "" if res.resid_acc is None else f"{float(res.resid_acc[i]):.3f}"
        t.add_row(str(layer), str(h), f"{float(res.head_acc[i, h]):.3f}", f"{float(res.head_auc[i, h]):.3f}", racc)
    console.print(t)
