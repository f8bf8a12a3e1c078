"""SelfIE commands: ``interpret``, ``interpret-vector`` and ``fit selfie-control`` (apply the file with
``steerlab generate --intervention FILE`` or read its effect with ``steerlab interpret --intervention FILE``)."""

from __future__ import annotations

import typer
from rich.markup import escape

from .app import EXPLAIN, MODEL, app, check_out_file, command, console, fit_app, floats, ints, load_model
from .tables import print_interpretations, print_vector_interpretations


@command(app, panel=EXPLAIN)
def interpret(
    prompt: str = typer.Argument(..., help="Original prompt whose hidden states the model describes."),
    model: str = MODEL,
    layers: str = typer.Option("", help="Comma-separated hidden-state layers (0 = embeddings, L = output of block "
                               "L-1, negative from the end); default: 6 layers spread over the model."),
    tokens: str = typer.Option("-1", help="Comma-separated token indices of the prompt (negative from the end)."),
    k: int = typer.Option(1, "-k", help="Inject before decoder block k (the input of block k)."),
    mode: str = typer.Option("replace", help="replace | add (strength x state) | none (no injection: a control)."),
    strength: float = typer.Option(1.0, help="Multiple of the state added in --mode add."),
    max_new_tokens: int = typer.Option(30, min=1, help="Greedy tokens per interpretation."),
    template: str = typer.Option("", help="Interpretation prompt, each [X] one placeholder token, e.g. "
                                 "'[X][X][X][X][X] Sum up what this means in a few words.' (default: that, as a "
                                 "user turn when the model has a chat template)."),
    plain: bool = typer.Option(False, help="Do not wrap the interpretation prompt in the chat template."),
    chat: bool = typer.Option(False, help="Render the original prompt as a user turn with the chat template."),
    batch_size: int = typer.Option(32, min=1, help="Interpretations decoded per generate call."),
    html: str = typer.Option("", "--html", help="Also write a (layer x token) grid of the interpretations to this HTML file."),
    intervention: str = typer.Option("", "--intervention", "-i", help="Read the prompt's states with this saved "
                                     "intervention applied (e.g. from `steerlab fit selfie-control`) and show "
                                     "their interpretations next to the unedited ones; the interpretation prompt "
                                     "runs unedited."),
    alpha: float | None = typer.Option(None, help="Strength passed to the intervention's apply."),
) -> None:
    """SelfIE: the model describes its own hidden states. Each state (layer, token) of the prompt is
    written at the placeholders of an interpretation prompt before block k and decoded greedily; the
    relevancy is the mean |p(token | injected) - p(token | not injected)| over the interpretation."""
    from ..explain.selfie import grid_report, interpretation_prompt, parse_parts, spread_layers
    from ..explain.selfie import interpret as run_interpret
    from ..interventions import load as load_intervention

    if html:
        check_out_file(html, "--html")
    m = load_model(model)
    iv = load_intervention(intervention, m) if intervention else None
    if alpha is not None and iv is None:
        raise typer.BadParameter("--alpha needs --intervention", param_hint="--alpha")
    ls = ints(layers, "--layers") or spread_layers(m)
    ts = ints(tokens, "--tokens") or [-1]
    parts = parse_parts(template) if template else None
    ip = interpretation_prompt(m, parts, chat=False if plain else None)
    kw = dict(k=k, mode=mode, strength=strength, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    pairs = [(L, t) for L in ls for t in ts]
    res = run_interpret(m, prompt, pairs, ip, **kw)
    edited = None if iv is None else run_interpret(m, prompt, pairs, ip, **kw, intervention=iv,
                                                   apply_options={} if alpha is None else {"alpha": alpha})
    print_interpretations(res, edited, f"SelfIE on {m.name}: {prompt!r} (k={k}, {mode})", intervention)
    if html:
        path = grid_report(edited or res, f"SelfIE on {m.name}" + (f" with {intervention}" if iv else "")).write(html)
        console.print(f"wrote {path}")


@command(app, "interpret-vector", panel=EXPLAIN)
def interpret_vector(
    path: str = typer.Argument(..., help="A saved steering vector (.safetensors from `steerlab fit steering`)."),
    model: str = MODEL,
    sites: str = typer.Option("", help="Comma-separated sites of the vector to interpret (default: all)."),
    norm: str = typer.Option("typical", help="Rescale each direction to this norm first: a number, 'typical' (the "
                             "median state norm where it is injected) or 'none'."),
    k: int = typer.Option(1, "-k", help="Inject before decoder block k (the input of block k)."),
    max_new_tokens: int = typer.Option(30, min=1, help="Greedy tokens per interpretation."),
    template: str = typer.Option("", help="Interpretation prompt, each [X] one placeholder token."),
    plain: bool = typer.Option(False, help="Do not wrap the interpretation prompt in the chat template."),
    html: str = typer.Option("", "--html", help="Also write the interpretations to this HTML file."),
) -> None:
    """SelfIE on a steering vector: the model describes each site's direction, written at the
    placeholders of the interpretation prompt like a hidden state."""
    import torch

    from ..explain import selfie as sf
    from ..interventions import load as load_intervention

    if html:
        check_out_file(html, "--html")
    m = load_model(model)
    iv = load_intervention(path, m, strict=False)
    dirs = getattr(iv, "directions", None)
    if not dirs:
        raise sf.SelfieError(f"{path} holds a {iv.method!r} intervention, not a steering vector with directions")
    names = [x.strip() for x in sites.split(",") if x.strip()] or list(dirs)
    missing = [x for x in names if x not in dirs]
    if missing:
        raise sf.SelfieError(f"site {missing[0]!r} is not in {path}; it has {', '.join(dirs)}")
    scale = None if norm == "none" else (norm if norm == "typical" else floats(norm, "--norm")[0])
    ip = sf.interpretation_prompt(m, sf.parse_parts(template) if template else None, chat=False if plain else None)
    res = sf.interpret_vectors(m, torch.stack([dirs[x] for x in names]), ip, k=k, norm=scale,
                               max_new_tokens=max_new_tokens, labels=names)
    print_vector_interpretations(res, f"SelfIE on {path} ({m.name}, k={k}, norm {norm})")
    if html:
        console.print(f"wrote {sf.grid_report(res, f'SelfIE on {path}').write(html)}")


def preserve_texts(texts: list[str], files: list[str]) -> list[str]:
    """The reference texts: each ``--preserve TEXT`` then every text of each ``--preserve-file``."""
    from ..data import load_prompts

    out = list(texts)
    for f in files:
        out += [p.text for p in load_prompts(f)]
    return out


def check_control_input(out: str, prompt: str, target: str, preserve: list[str]) -> None:
    """Raise a one-line :class:`ControlError` for input that cannot work, before any model is loaded."""
    from pathlib import Path

    from ..explain.selfie_control import ControlError

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
    model: str = MODEL,
) -> None:
    """SelfIE supervised control: learn an edit of block L-1's MLP that moves the state at (--layer,
    --token) of --prompt toward the last-token state of --target at the same layer; prints the
    distance before and after, saves the edit (apply with `generate --intervention FILE [--alpha A]`,
    read its effect with `interpret PROMPT --intervention FILE`)."""
    from ..interventions import fit

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
