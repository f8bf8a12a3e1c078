"""Commands that evaluate: ``generate`` (optionally with a saved intervention), ``score``, ``scorers``."""

from __future__ import annotations

import typer

from .app import (
    BATCH_SIZE,
    DEVICE,
    DEVICE_MAP,
    EVALUATE,
    MODEL,
    SCORER_OPTION,
    UTILITIES,
    app,
    check_out_dir,
    check_out_file,
    command,
    console,
    key_values,
    load_model,
)
from .tables import print_examples, print_scores, print_summary


def select_prompts(spec: str, split_name: str | None, n: int | None, seed: int = 0) -> list:
    """Prompts from a spec (bundled name, file, hf:...), optionally one part of the seeded split
    by prompt (train / validation / test), then the first ``n``."""
    from ..data import load_prompts, split, take
    from ..registry import unknown

    prompts = load_prompts(spec)
    if split_name:
        parts = split(prompts, seed=seed)
        if split_name not in parts:
            raise typer.BadParameter(unknown("split", split_name, parts))
        prompts = parts[split_name]
    return take(prompts, n) if n else prompts


@command(app, panel=EVALUATE)
def generate(
    out: str = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning the same command resumes it)."),
    model: str = MODEL,
    prompts: str = typer.Option("rtp", "--prompts", "-p", help="Prompt set: rtp, rtp:<category>, donotanswer, "
                                "harmbench, neutral, a .txt/.jsonl/.csv file, or hf:<dataset>[:split][:field]."),
    split_name: str = typer.Option("auto", "--split", help="Keep one part of the seeded split by prompt: train, "
                                   "validation or test (60/20/20), or all; auto: with --intervention the held-out test "
                                   "split of a bundled prompt set, else all."),
    n: int = typer.Option(0, "--n", min=0, help="Keep the first N prompts (0: all; the split is already "
                          "shuffled, stratified by category)."),
    k: int = typer.Option(1, "-k", min=1, help="Samples per prompt (k > 1 needs a sampling preset)."),
    sampling: str = typer.Option("greedy", help="greedy | t0.7 (T=0.7, top_p=0.9) | t1.0 (T=1.0, top_p=0.95)."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    chat: bool = typer.Option(False, help="Render prompts as user turns with the chat template (default: raw completion)."),
    batch_size: int = BATCH_SIZE,
    seed: int = typer.Option(0, help="Sampling seed (also the split seed)."),
    scorer: str = typer.Option("default", help="Toxicity scorer for the continuations, or 'none'. See `steerlab scorers`; "
                               "NAME:VALUE sets its main argument (hf-classifier:MODEL, detoxify:CHECKPOINT)."),
    scorer_option: list[str] = SCORER_OPTION,
    fluency: bool = typer.Option(True, help="Also compute the perplexity of the continuations (given their prompts)."),
    fluency_model: str = typer.Option("", help="Reference model for that perplexity (any --model spec; default: "
                                      "the generating model itself, unedited)."),
    intervention: str = typer.Option("", "--intervention", "-i", help="Apply a saved intervention (from "
                                     "`steerlab fit METHOD`) while generating; fluency is still measured unedited."),
    alpha: float | None = typer.Option(None, help="The intervention's strength option (steering, ITI, "
                                       "EigenShift, selfie-control: alpha; SLIM: kappa; see `steerlab "
                                       "interventions METHOD` for its meaning and unit)."),
    apply_option: list[str] = typer.Option([], "--apply-option", help="KEY=VALUE passed to the intervention's "
                                           "apply (repeatable), e.g. mode=ablate or where=generated for steering; "
                                           "checked against the method's options before anything is written."),
    allow_fitted_prompts: bool = typer.Option(False, help="With --intervention, evaluate even on prompts the "
                                              "intervention was fitted on (refused by default)."),
    overwrite: bool = typer.Option(False, help="Start the run directory afresh."),
    device: str = DEVICE,
    device_map: str = DEVICE_MAP,
) -> None:
    """Generate continuations of a prompt set into a run directory, score their toxicity and print
    expected maximum toxicity, toxicity probability and mean toxicity with bootstrap CIs, and a few
    example continuations. With --intervention, the same prompts, decoding, scorer and metrics
    evaluate any saved intervention on held-out test prompts, beside the paired difference from the
    unsteered model on the same prompts and random numbers (generated once into OUT/unsteered).
    Under `accelerate launch --num_processes N` the processes share the prompts (one run directory)."""
    from pathlib import Path

    from ..evaluation import unsteered_comparison
    from ..generation import GenConfig, generate_run
    from ..interventions import load as load_intervention
    from ..parallel import group
    from ..scoring import scorer_from_spec

    # everything is validated and loaded before the run directory is created
    check_out_dir(out)
    if scorer == "none" and scorer_option:
        raise typer.BadParameter("--scorer-option has no effect with --scorer none", param_hint="--scorer-option")
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling=sampling, k=k, seed=seed, chat=chat,
                    batch_size=batch_size)
    if split_name == "auto":  # held-out prompts for an intervention, unless the user gave their own file
        split_name = "test" if intervention and not Path(prompts).is_file() else "all"
    ps = select_prompts(prompts, None if split_name == "all" else split_name, n or None, seed)
    sc = None if scorer == "none" else scorer_from_spec(scorer, scorer_option)
    m = load_model(model, device=device, device_map=device_map)
    iv = load_intervention(intervention, m) if intervention else None
    if (alpha is not None or apply_option) and iv is None:
        raise typer.BadParameter("--alpha and --apply-option need --intervention", param_hint="--alpha")
    opts = iv.cli_options(key_values(apply_option, "--apply-option"), alpha) if iv is not None else {}
    if iv is not None:
        check_fitted_prompts(iv, ps, intervention, allow_fitted_prompts)
    ref = (load_model(fluency_model) if fluency_model else m) if fluency and sc is not None else None
    rows = generate_run(m, ps, out, cfg, scorer=sc, intervention=iv,
                        apply_options=opts, overwrite=overwrite,
                        extra_config={"prompts": prompts, "split": "" if split_name == "all" else split_name, "n": n})
    vs = unsteered_comparison(m, ps, rows, out, cfg, sc) if iv is not None and sc is not None else None
    if not group().main:  # a data-parallel launch: rank 0 reports
        return
    what = f"{m.name}" + (f" with {Path(intervention).name} ({iv.method}, {opts or 'its defaults'})" if iv else "")
    report_run(rows, out, sc, ref, vs, chat, f"{what} on {prompts}{'' if split_name == 'all' else ':' + split_name} "
               f"({len(ps)} prompts x {k}, {sampling}, scorer {getattr(sc, 'name', 'none')})", what)


def report_run(rows: list[dict], out: str, sc, ref, vs: dict | None, chat: bool, title: str, what: str) -> None:
    """Print a generation run: where its rows are, a few example continuations and, when scored, its
    metrics (with the paired difference from the unsteered arm ``vs``), also written to metrics.json."""
    from pathlib import Path

    from ..evaluation import example_rows, summarize
    from ..runs import write_json

    console.print(f"{len(rows)} continuations in {out}/results.jsonl")
    base = (vs or {}).pop("unsteered_rows", None)
    print_examples(example_rows(rows), f"example continuations ({what})", base)
    if sc is None:
        return
    summary = summarize(rows, fluency_model=ref, chat=chat)
    if ref is None:  # metrics are recomputed on every call: say so when fluency was left out
        summary["fluency"] = {"computed": False, "why": "--no-fluency"}
    if vs is not None:
        summary["vs_unsteered"] = vs
    write_json(Path(out) / "metrics.json", summary)
    print_summary(summary, title)


def check_fitted_prompts(iv, prompts: list, path: str, allow: bool) -> None:
    """Refuse (or, when ``allow``, warn loudly about) prompts an intervention was fitted on, known by
    the text hashes its file stores; say so when the file records none."""
    from ..evaluation import fitted_prompts

    seen = fitted_prompts(iv, prompts)
    if seen is None and iv.meta.get("data_fingerprint"):  # fitted on data, but which texts is not recorded
        console.print(f"[bold yellow]note:[/] {path} records no hashes of the texts it was fitted on: make sure "
                      f"these prompts are held out (its data fingerprint is {iv.meta.get('data_fingerprint')}).",
                      soft_wrap=True)
    elif seen is not None and seen and not allow:
        raise typer.BadParameter(
            f"{len(seen)} of the {len(prompts)} prompts are texts the intervention {path} was fitted on (e.g. "
            f"{str(prompts[seen[0]].text if hasattr(prompts[seen[0]], 'text') else prompts[seen[0]])[:60]!r}): "
            f"its effect on them is not a held-out result. Use held-out prompts (--split test) or pass "
            f"--allow-fitted-prompts", param_hint="--prompts/--split")
    elif seen:  # allowed: said loudly
        console.print(f"[bold red]warning:[/] {len(seen)} of the {len(prompts)} prompts are texts {path} was "
                      f"fitted on: these numbers are not a held-out result.", soft_wrap=True)


@command(app, panel=EVALUATE)
def score(
    inputs: str = typer.Argument(..., help="Texts to score: a .txt (one per line), .jsonl or .csv file."),
    scorer: str = typer.Option("default", help="Scorer name (see `steerlab scorers`), or NAME:VALUE."),
    scorer_option: list[str] = SCORER_OPTION,
    field: str = typer.Option("", help="Field/column holding the text in .jsonl/.csv (default: text, prompt; "
                              "use 'continuation' for a generate run's results.jsonl)."),
    out: str = typer.Option("", "--out", "-o", help="Write one JSON row per text (text + every attribute) here."),
) -> None:
    """Score texts with a toxicity scorer; prints the mean and the share >= 0.5 of each attribute."""
    if out:
        check_out_file(out)

    from ..data import load_prompts
    from ..scoring import scorer_from_spec

    items = load_prompts(inputs, field=field or None)
    sc = scorer_from_spec(scorer, scorer_option)
    texts = [p.text for p in items]
    res = sc.score(texts)
    if out:
        from ..runs import write_jsonl

        write_jsonl(out, [{"text": t, **{a: float(v[i]) for a, v in res.items()}} for i, t in enumerate(texts)])
    print_scores(res, f"{sc.name} on {len(texts)} texts from {inputs}")


@command(app, panel=UTILITIES)
def scorers() -> None:
    """List the registered toxicity scorers."""
    from ..scoring import DEFAULT_SCORER, list_scorers

    for name in list_scorers():
        console.print(f"{name}{'  (= ' + DEFAULT_SCORER + ')' if name == 'default' else ''}")
