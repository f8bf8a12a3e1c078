"""Commands on attention heads: ``probes`` (``fit iti`` and ``fit slim`` are ``steerlab fit METHOD``)."""

from __future__ import annotations

import typer

from .app import (
    EXPLAIN,
    MODEL,
    SCORER_OPTION,
    app,
    command,
    console,
    ints,
    load_model,
)
from .tables import print_probes

PROMPTS_HELP = ("Prompt set whose training and validation parts (seeded 60/20/20 split by prompt) are scored: "
                "in each part the most toxic prompts are labelled toxic and the least toxic non-toxic.")


def labelled_data(prompts: str, scorer: str, scorer_option: list[str], n_train: int, n_val: int, seed: int):
    from ..steer.iti import LabelledDataOptions

    return LabelledDataOptions(prompts, n_train, n_val, scorer, scorer_option, seed).labelled()


def layer_list(text: str) -> list[int] | None:
    return ints(text, "--layers") or None


PROMPTS = typer.Option("rtp", help=PROMPTS_HELP)
N_TRAIN = typer.Option(64, min=2, help="Texts per class from the training part.")
N_VAL = typer.Option(32, min=2, help="Texts per class from the validation part.")
SCORER = typer.Option("default", help="Scorer that labels the prompts (or NAME:VALUE).")
SEED = typer.Option(0, help="Seed of the split.")
LAYERS = typer.Option("", help="Comma-separated layers to probe (default: all).")


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
