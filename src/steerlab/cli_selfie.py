"""Command-line command for SelfIE supervised control: ``steerlab fit selfie-control`` (registered on
the main app by :mod:`steerlab.cli`; apply the file with ``steerlab generate --intervention FILE`` or
read its effect with ``steerlab interpret --intervention FILE``)."""

from __future__ import annotations

import typer
from rich.markup import escape

from .cli import MODEL_HELP, command, console, fit_app


def preserve_texts(texts: list[str], files: list[str]) -> list[str]:
    """The reference texts: each ``--preserve TEXT`` then every text of each ``--preserve-file``."""
    from .data import load_prompts

    out = list(texts)
    for f in files:
        out += [p.text for p in load_prompts(f)]
    return out


def check_control_input(out: str, prompt: str, target: str, preserve: list[str]) -> None:
    """Raise a one-line :class:`ControlError` for input that cannot work, before any model is loaded."""
    from pathlib import Path

    from .explain.selfie_control import ControlError

    if Path(out).is_dir():
        raise ControlError(f"--out {out} is a directory; give a file path such as {out.rstrip('/')}/control.safetensors")
    if not prompt:
        raise ControlError("--prompt is empty: give the source prompt whose state is moved")
    if not target:
        raise ControlError("--target is empty: give a text whose last-token state at --layer is the target")
    if any(not t for t in preserve):
        raise ControlError("a --preserve text is empty")


@command(fit_app, "selfie-control")
def fit_selfie_control(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file (only the weight delta + header)."),
    prompt: str = typer.Option(..., "--prompt", help="Source prompt whose hidden state is moved."),
    layer: int = typer.Option(..., "--layer", help="Hidden-state layer (1..n_layers = output of block L-1, "
                              "negative from the end); the MLP down projection of block L-1 is edited."),
    target: str = typer.Option(..., "--target", help="Target text: its last-token state at the same layer is "
                               "where the source state is moved."),
    token: int = typer.Option(-1, "--token", help="Token of the source prompt whose state is moved (negative "
                              "from the end)."),
    preserve: list[str] = typer.Option([], "--preserve", help="Reference text whose states at the layer should "
                                       "stay as they are (repeatable)."),
    preserve_file: list[str] = typer.Option([], "--preserve-file", help="File of reference texts "
                                            "(.txt/.jsonl/.csv; repeatable)."),
    preserve_weight: float = typer.Option(1.0, "--preserve-weight", min=0.0, help="Weight of the preservation "
                                          "term (mean squared change of the reference states)."),
    steps: int = typer.Option(15, "--steps", min=1, help="Adam steps."),
    lr: float = typer.Option(3e-4, "--lr", help="Adam learning rate."),
    chat: bool = typer.Option(False, help="Render the prompt, target and references as user turns with the "
                              "chat template."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
) -> None:
    """SelfIE supervised control: learn an edit of block L-1's MLP that moves the state at (--layer,
    --token) of --prompt toward the last-token state of --target at the same layer; prints the
    distance before and after, saves the edit (apply with `generate --intervention FILE [--alpha A]`,
    read its effect with `interpret PROMPT --intervention FILE`)."""
    from .cli_heads import load_model
    from .interventions import fit

    refs = preserve_texts(preserve, preserve_file)
    check_control_input(out, prompt, target, refs)
    m = load_model(model)
    iv = fit("selfie-control", m, prompt, layer=layer, token=token, target=target, steps=steps, lr=lr,
             preserve=refs or None, preserve_weight=preserve_weight, chat=chat)
    d0, d1 = iv.meta["distance_before"], iv.meta["distance_after"]
    console.print(f"distance to the target at layer {iv.meta['layer']}, token {iv.meta['token']}: {d0:.4g} -> "
                  f"{d1:.4g} ({100 * (d1 - d0) / max(d0, 1e-12):+.1f} %) after {steps} steps"
                  + (f", {len(refs)} reference text(s) preserved" if refs else ""))
    iv.save(out)
    console.print(escape(f"saved {iv.describe()} to {out}"))
