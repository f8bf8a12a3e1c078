"""Steering-vector commands: ``interventions``, ``steer export-gguf``, ``steer study``."""

from __future__ import annotations

import typer

from .app import (
    MODEL,
    STEER,
    app,
    check_out_file,
    command,
    console,
    floats,
    ints,
    load_model,
    names,
    steer_app,
)
from .tables import print_rows, print_steering_test


@command(app, panel=STEER)
def interventions(method: str = typer.Argument("", help="A method: list its fit and apply options.")) -> None:
    """List the registered intervention methods, or one method's options with meaning and unit (fit with
    `steerlab fit METHOD --OPTION VALUE`, apply with `steerlab generate --intervention FILE`)."""
    from ..interventions import METHODS, get, list_interventions
    from ..options import describe

    if not method:
        rows = [(name, doc, METHODS[name].strength_option or "-") for name, doc in list_interventions().items()]
        print_rows("registered interventions (`steerlab interventions METHOD` lists a method's options)",
                   ["method", "what", "--alpha sets"], rows)
        return
    cls = get(method)
    cols = ["option", "type", "default", "allowed", "unit", "meaning"]
    print_rows(f"{method}: fit options (`steerlab fit {method} --OPTION VALUE`)", cols, describe(cls.FitOptions))
    print_rows(f"{method}: apply options (`generate --intervention FILE --apply-option KEY=VALUE`; --alpha sets "
               f"{cls.strength_option or 'nothing'})", cols, describe(cls.ApplyOptions))


@command(steer_app, "export-gguf")
def steer_export(
    vector: str = typer.Argument(..., help="A steering vector saved by `steerlab steer fit`."),
    out: str = typer.Argument(..., help="Output .gguf control vector for llama.cpp (--control-vector)."),
) -> None:
    """Export the resid_post directions of a vector as a llama.cpp control vector."""
    check_out_file(out)
    from ..steer import SteeringVector

    path = SteeringVector.load(vector).to_gguf(out)
    console.print(f"wrote {path}")


@command(steer_app, "study")
def steer_study(
    out: str = typer.Option(..., "--out", "-o", help="Run directory (rerun to resume)."),
    model: str = MODEL,
    prompts: str = typer.Option("rtp", help="Prompt set, split 60/20/20 into train / validation / test by prompt."),
    layers: str = typer.Option("3,6,9,12,15,18,21,24", help="Layers to sweep."),
    alphas: str = typer.Option("-0.5,-0.25,-0.1,0,0.1,0.25,0.5", help="Strengths, in units of the layer's typical residual norm."),
    n_pairs: int = typer.Option(64, help="Contrast pairs from the training split."),
    n_sweep: int = typer.Option(24, help="Validation prompts per sweep cell."),
    k_sweep: int = typer.Option(1, min=1, help="Samples per validation prompt in the sweep (more: a less noisy choice)."),
    max_ppl_ratio: float = typer.Option(2.0, help="The chosen cell's perplexity may be at most this times the "
                                        "unsteered one (on validation)."),
    min_distinct_ratio: float = typer.Option(0.8, help="The chosen cell's distinct-2 must be at least this times "
                                             "the unsteered one (on validation; rejects repetitive text)."),
    refine_top: int = typer.Option(3, min=1, help="Stage 2 of the sweep: re-run this many best admissible cells ..."),
    k_refine: int = typer.Option(3, min=1, help="... with this many samples per validation prompt."),
    n_test: int = typer.Option(100, help="Held-out test prompts."),
    k_test: int = typer.Option(3, help="Samples per test prompt."),
    max_new_tokens: int = typer.Option(20, help="New tokens per continuation."),
    where: str = typer.Option("all", help="Schedule: all | prompt | generated."),
    positions: str = typer.Option("mean_skip_first", help="Fitting positions: last | mean | mean_skip_first | aligned."),
    method: str = typer.Option("mean_diff", help="mean_diff | pca | probe."),
    scorer: str = typer.Option("default", help="Toxicity scorer."),
    seed: int = typer.Option(0, help="Seed of the split and of sampling."),
    variants: str = typer.Option("add", help="Comma-separated steering variants, each MODE[:WHERE][:multi]: mode "
                                 "add | gated | ablate | clamp, schedule (default --where), multi = every layer at "
                                 "once at alpha / n_layers each. E.g. add,add:generated,gated,ablate,clamp,add:multi."),
    fractions: str = typer.Option("0.5,1,2", help="Strengths of ablate (share of the component removed) and clamp "
                                  "(level between the toxic and non-toxic mean projections)."),
    max_kl: float = typer.Option(None, help="Rule: neutral-text KL from the unedited model at most this (nats, on "
                                 "neutral validation texts); e.g. 0.05 with --max-ppl-ratio 1.1 for issue 15's target."),
    n_neutral: int = typer.Option(52, min=1, help="Neutral texts per part (validation: the rule; test: the report)."),
    pareto: bool = typer.Option(True, help="Also evaluate every variant x positive strength on the test prompts "
                                "for the trade-off figure (figures/pareto.png; never used for choosing)."),
) -> None:
    """Fit a toxicity steering vector on the training split, sweep variants x layers x strengths on
    validation prompts (heat maps), then test the chosen setting, its negation and a random control
    on held-out prompts with bootstrap CIs, fluency, and side effects on neutral text (perplexity,
    KL); with --pareto, the toxicity / fluency trade-off of every variant on the test prompts."""
    from ..experiments.steering import SteeringStudy, run_steering_study

    m = load_model(model)
    st = SteeringStudy(prompts=prompts, layers=ints(layers), alphas=floats(alphas), n_pairs=n_pairs,
                       n_sweep=n_sweep, k_sweep=k_sweep, max_ppl_ratio=max_ppl_ratio,
                       min_distinct_ratio=min_distinct_ratio, refine_top=refine_top, k_refine=k_refine,
                       n_test=n_test, k_test=k_test, max_new_tokens=max_new_tokens, where=where,
                       positions=positions, method=method, scorer=scorer, seed=seed,
                       variants=names(variants), fractions=floats(fractions, "--fractions"),
                       max_kl=max_kl, n_neutral=n_neutral, pareto=pareto)
    metrics = run_steering_study(m, out, st)
    ch = metrics["chosen"]
    if ch["site"] is None:
        console.print("no validation cell satisfies the selection rule; only the unsteered arm and the trade-off "
                      f"points were evaluated (see {out}/figures/pareto.png)")
    print_steering_test(metrics, m.name)
    if "pareto" in metrics:
        met = [p["arm"] for p in metrics["pareto"]["points"] if p["target"]["met"]]
        console.print(f"trade-off points meeting the target on test: {', '.join(met) if met else 'none'}")
    console.print(f"figures: {out}/figures/sweep_*.png, {out}/figures/test_toxicity.png, {out}/figures/pareto.png")
