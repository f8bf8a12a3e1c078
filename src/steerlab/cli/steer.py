"""Steering-vector commands: ``interventions``, ``steer export-gguf``, ``steer study``."""

from __future__ import annotations

import typer

from ..experiments.steering_config import SteeringStudy
from .app import MODEL, STEER, app, check_out_file, command, console, load_model, steer_app
from .settings import settings_options
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
@settings_options(SteeringStudy)
def steer_study(
    settings: dict,
    out: str = typer.Option(..., "--out", "-o", help="Run directory (rerun to resume)."),
    model: str = MODEL,
) -> None:
    """Fit a toxicity steering vector on the training split, sweep variants x layers x strengths on
    validation prompts (heat maps), then test the chosen setting, its negation and a random control
    on held-out prompts with bootstrap CIs, fluency, and side effects on neutral text (perplexity,
    KL); with --pareto, the toxicity / fluency trade-off of every variant on the test prompts."""
    from ..experiments.steering import run_steering_study

    m = load_model(model)
    metrics = run_steering_study(m, out, SteeringStudy(**settings))
    ch = metrics["chosen"]
    if ch["site"] is None:
        console.print("no validation cell satisfies the selection rule; only the unsteered arm and the trade-off "
                      f"points were evaluated (see {out}/figures/pareto.png)")
    print_steering_test(metrics, m.name)
    if "pareto" in metrics:
        met = [p["arm"] for p in metrics["pareto"]["points"] if p["target"]["met"]]
        console.print(f"trade-off points meeting the target on test: {', '.join(met) if met else 'none'}")
    console.print(f"figures: {out}/figures/sweep_*.png, {out}/figures/test_toxicity.png, {out}/figures/pareto.png")
