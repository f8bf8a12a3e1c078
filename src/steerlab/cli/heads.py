"""Commands on attention heads: ``probes``, ``fit iti`` and ``fit slim``."""

from __future__ import annotations

import typer

from .app import (
    EXPLAIN,
    MODEL,
    OUT_FILE,
    SCORER_OPTION,
    app,
    check_out_file,
    command,
    console,
    fit_app,
    ints,
    load_model,
)
from .tables import print_probes

PROMPTS_HELP = ("Prompt set whose training and validation parts (seeded 60/20/20 split by prompt) are scored: "
                "in each part the most toxic prompts are labelled toxic and the least toxic non-toxic.")


def labelled_data(prompts: str, scorer: str, scorer_option: list[str], n_train: int, n_val: int, seed: int):
    from ..explain.probes import toxicity_labels
    from ..scoring import scorer_from_spec

    return toxicity_labels(prompts, scorer_from_spec(scorer, scorer_option), n_train, n_val, seed)


def layer_list(text: str) -> list[int] | None:
    return ints(text, "--layers") or None


PROMPTS = typer.Option("rtp", help=PROMPTS_HELP)
N_TRAIN = typer.Option(64, min=2, help="Texts per class from the training part.")
N_VAL = typer.Option(32, min=2, help="Texts per class from the validation part.")
SCORER = typer.Option("default", help="Scorer that labels the prompts (or NAME:VALUE).")
SEED = typer.Option(0, help="Seed of the split.")
LAYERS = typer.Option("", help="Comma-separated layers to probe (default: all).")


@command(fit_app, "iti")
def fit_iti(out: str = OUT_FILE, model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
            k: int = typer.Option(16, min=1, help="Heads to shift (top K by validation accuracy)."),
            scorer: str = SCORER, scorer_option: list[str] = SCORER_OPTION, seed: int = SEED,
            layers: str = LAYERS) -> None:
    """Inference-time intervention: probe every head on toxic vs non-toxic prompts, keep the top K, and
    save their centre-of-mass shifts (apply with `generate --intervention FILE --alpha 15`)."""
    from ..interventions import fit

    check_out_file(out)
    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    iv = fit("iti", load_model(model), data, k=k, layers=layer_list(layers))
    iv.save(out)
    best = ", ".join(f"{h['layer']}.{h['head']} ({h['accuracy']:.2f})" for h in iv.meta["heads"][:5])
    console.print(f"saved {iv.describe()} to {out}; top heads (layer.head, validation accuracy): {best}")


@command(fit_app, "slim")
def fit_slim(out: str = OUT_FILE, model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
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
    from ..interventions import fit

    check_out_file(out)
    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    iv = fit("slim", load_model(model), data, gamma=gamma, layer=layer, epochs=epochs, shrink=shrink,
             layers=layer_list(layers), solver=solver)
    iv.save(out)
    failed = iv.meta["failed_heads"]
    console.print(f"saved {iv.describe()} to {out}: layer {iv.layer}, tau {iv.tau}, validation risk "
                  f"{min(iv.meta['layer_risk']):.3f}" + (f"; heads left unedited: {sorted(failed)}" if failed else ""))


@command(app, "probes", panel=EXPLAIN)
def probes(out: str = typer.Option(..., "--out", "-o", help="Output directory (probes.json, figures/)."),
           model: str = MODEL, prompts: str = PROMPTS, n_train: int = N_TRAIN, n_val: int = N_VAL,
           scorer: str = SCORER, scorer_option: list[str] = SCORER_OPTION, seed: int = SEED,
           layers: str = LAYERS, top: int = typer.Option(10, min=1, help="Heads listed.")) -> None:
    """Logistic probes for toxic vs non-toxic prompts at every (layer, head) and every residual stream:
    validation accuracy and AUROC, a heat map (figures/probe_accuracy.png) and probes.json."""
    from pathlib import Path

    from ..explain.probes import heatmap, probe_data, probe_heads
    from ..runs import write_json

    data = labelled_data(prompts, scorer, scorer_option, n_train, n_val, seed)
    m = load_model(model)
    res = probe_heads(probe_data(m, data, layer_list(layers)))
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    write_json(d / "probes.json", res.to_dict())
    fig = heatmap(res, d / "figures" / "probe_accuracy.png")
    print_probes(res, f"top heads, {m.name} ({data.source})", top)
    console.print(f"wrote {d / 'probes.json'} and {fig}")
