"""Command-line commands on attention heads: ``steerlab probes``, ``steerlab fit iti`` and
``steerlab fit slim`` (registered on the main app by :mod:`steerlab.cli`)."""

from __future__ import annotations

import typer
from rich.table import Table

from .cli import MODEL_HELP, app, check_out_file, command, console, fit_app

PROMPTS_HELP = ("Prompt set whose training and validation parts (seeded 60/20/20 split by prompt) are scored: "
                "in each part the most toxic prompts are labelled toxic and the least toxic non-toxic.")


def labelled_data(prompts: str, scorer: str, scorer_option: list[str], n_train: int, n_val: int, seed: int):
    from .explain.probes import toxicity_labels
    from .scoring import scorer_from_spec

    return toxicity_labels(prompts, scorer_from_spec(scorer, scorer_option), n_train, n_val, seed)


def load_model(spec: str):
    from .models import load

    with console.status(f"loading {spec} ..."):
        return load(spec)


def layer_list(text: str) -> list[int] | None:
    try:
        return [int(x) for x in text.split(",") if x.strip()] or None
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--layers") from None


OUT = typer.Option(..., "--out", "-o", help="Output .safetensors file.")
MODEL = typer.Option("default", "--model", "-m", help=MODEL_HELP)
PROMPTS = typer.Option("rtp", help=PROMPTS_HELP)
N_TRAIN = typer.Option(64, min=2, help="Texts per class from the training part.")
N_VAL = typer.Option(32, min=2, help="Texts per class from the validation part.")
SCORER = typer.Option("default", help="Scorer that labels the prompts (or NAME:VALUE).")
SCORER_OPTION = typer.Option([], "--scorer-option", help="KEY=VALUE passed to the scorer (repeatable).")
SEED = typer.Option(0, help="Seed of the split.")
LAYERS = typer.Option("", help="Comma-separated layers to probe (default: all).")


@command(fit_app, "iti")
def fit_iti(out: str = OUT, model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
            k: int = typer.Option(16, min=1, help="Heads to shift (top K by validation accuracy)."),
            scorer: str = SCORER, scorer_option: list[str] = SCORER_OPTION, seed: int = SEED,
            layers: str = LAYERS) -> None:
    """Inference-time intervention: probe every head on toxic vs non-toxic prompts, keep the top K, and
    save their centre-of-mass shifts (apply with `generate --intervention FILE --alpha 15`)."""
    from .interventions import fit

    check_out_file(out)
    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    iv = fit("iti", load_model(model), data, k=k, layers=layer_list(layers))
    iv.save(out)
    best = ", ".join(f"{h['layer']}.{h['head']} ({h['accuracy']:.2f})" for h in iv.meta["heads"][:5])
    console.print(f"saved {iv.describe()} to {out}; top heads (layer.head, validation accuracy): {best}")


@command(fit_app, "slim")
def fit_slim(out: str = OUT, model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
             gamma: float = typer.Option(0.1, help="Chance-constraint level: the target is safe with probability "
                                         ">= 1 - gamma."),
             layer: int | None = typer.Option(None, help="Layer to edit (default: the lowest validation risk)."),
             epochs: int = typer.Option(500, min=1, help="Adam epochs of the risk-aware probes."),
             shrink: float = typer.Option(0.1, min=0.0, max=1.0, help="Covariance shrinkage towards a scaled identity."),
             solver: str = typer.Option("closed", help="Transport program solver: closed (exact closed form, ms per "
                                        "head) or cvxpy (the conic program with Clarabel, seconds per head)."),
             scorer: str = SCORER, scorer_option: list[str] = SCORER_OPTION, seed: int = SEED,
             layers: str = LAYERS) -> None:
    """SLIM: risk-aware head probes, a head-vote layer classifier and a Gaussian optimal-transport map
    per head (apply with `generate --intervention FILE [--alpha KAPPA]`)."""
    from .interventions import fit

    check_out_file(out)
    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    iv = fit("slim", load_model(model), data, gamma=gamma, layer=layer, epochs=epochs, shrink=shrink,
             layers=layer_list(layers), solver=solver)
    iv.save(out)
    failed = iv.meta["failed_heads"]
    console.print(f"saved {iv.describe()} to {out}: layer {iv.layer}, tau {iv.tau}, validation risk "
                  f"{min(iv.meta['layer_risk']):.3f}" + (f"; heads left unedited: {sorted(failed)}" if failed else ""))


@command(app, "probes")
def probes(out: str = typer.Option(..., "--out", "-o", help="Output directory (probes.json, figures/)."),
           model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
           scorer: str = SCORER, scorer_option: list[str] = SCORER_OPTION, seed: int = SEED,
           layers: str = LAYERS, top: int = typer.Option(10, min=1, help="Heads listed.")) -> None:
    """Logistic probes for toxic vs non-toxic prompts at every (layer, head) and every residual stream:
    validation accuracy and AUROC, a heat map (figures/probe_accuracy.png) and probes.json."""
    from pathlib import Path

    from .explain.probes import heatmap, probe_data, probe_heads
    from .runs import write_json

    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    m = load_model(model)
    res = probe_heads(probe_data(m, data, layer_list(layers)))
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    write_json(d / "probes.json", res.to_dict())
    fig = heatmap(res, d / "figures" / "probe_accuracy.png")
    t = Table(title=f"top heads, {m.name} ({data.source})", title_justify="left")
    for c in ("layer", "head", "val. accuracy", "val. AUROC", "residual accuracy (layer)"):
        t.add_column(c, justify="right")
    for layer, h in res.top_heads(min(top, res.head_acc.numel())):
        i = res.layers.index(layer)
        racc = "" if res.resid_acc is None else f"{float(res.resid_acc[i]):.3f}"
        t.add_row(str(layer), str(h), f"{float(res.head_acc[i, h]):.3f}", f"{float(res.head_auc[i, h]):.3f}", racc)
    console.print(t)
    console.print(f"wrote {d / 'probes.json'} and {fig}")
