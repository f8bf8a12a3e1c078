"""SelfIE commands: ``interpret`` and ``interpret-vector`` (``fit selfie-control`` is ``steerlab fit
METHOD``; read the effect of its file with ``steerlab interpret --intervention FILE``)."""

from __future__ import annotations

import typer

from .app import EXPLAIN, MODEL, app, check_out_file, command, console, floats, ints, load_model, names
from .tables import print_interpretations, print_vector_interpretations


@command(app, panel=EXPLAIN)
def interpret(
    prompt: str = typer.Argument(..., help="Original prompt whose hidden states the model describes."),
    model: str = MODEL,
    layers: str = typer.Option("", help="Comma-separated layers, l = the state after block l (blocks.l.resid_post), "
                               "negative from the end; default: 6 layers spread over the model (none with --sites)."),
    sites: str = typer.Option("", "--sites", help="Comma-separated d_model sites to interpret as well: "
                              "blocks.L.attn.out, blocks.L.mlp.out, blocks.L.resid_pre, blocks.L.attn.head.H (one "
                              "head's output through the output projection), embed."),
    hf_layers: bool = typer.Option(False, "--hf-layers", help="Read --layers in the SelfIE paper's numbering "
                                   "(hidden_states index: 0 = embeddings, L = output of block L-1)."),
    relevancy: str = typer.Option("signed", help="signed: p(token | injected) - p(token | not) (the treatment "
                                  "effect) | absolute: its absolute value."),
    baseline: str = typer.Option("none", help="none | norm (a random direction with each state's norm) | permute "
                                 "(each state's coordinates shuffled): also interpret one random control state per "
                                 "state and report its relevancy, so 'relevant' can be read against it."),
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
    """SelfIE: the model describes its own hidden states. Each state (layer or site, token) of the
    prompt is written at the placeholders of an interpretation prompt before block k and decoded
    greedily; the relevancy is the mean of p(token | injected) - p(token | not injected) over the
    interpretation (--relevancy absolute: of its absolute value)."""
    from ..explain.selfie import grid_report, interpretation_prompt, parse_parts, spread_layers
    from ..explain.selfie import interpret as run_interpret
    from ..interventions import load as load_intervention

    if html:
        check_out_file(html, "--html")
    m = load_model(model)
    iv = load_intervention(intervention, m) if intervention else None
    if alpha is not None and iv is None:
        raise typer.BadParameter("--alpha needs --intervention", param_hint="--alpha")
    opts = {} if iv is None else iv.cli_options({}, alpha)
    numbering = "hf" if hf_layers else "blocks"
    named = names(sites)
    ls = ints(layers, "--layers") or ([] if named else spread_layers(m, numbering=numbering))
    ts = ints(tokens, "--tokens") or [-1]
    parts = parse_parts(template) if template else None
    ip = interpretation_prompt(m, parts, chat=False if plain else None)
    kw = dict(k=k, mode=mode, strength=strength, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat,
              numbering=numbering, relevancy_form=relevancy, baseline=None if baseline == "none" else baseline)
    pairs = [(L, t) for L in [*ls, *named] for t in ts]
    res = run_interpret(m, prompt, pairs, ip, **kw)
    edited = None if iv is None else run_interpret(m, prompt, pairs, ip, **kw, intervention=iv,
                                                   apply_options=opts)
    print_interpretations(res, edited, f"SelfIE on {m.name}: {prompt!r} (k={k}, {mode}, {relevancy} relevancy)",
                          intervention)
    console.print("layers: " + ("the paper's numbering, L = output of block L-1 (0 = embeddings)" if hf_layers
                                else "l = the state after block l (blocks.l.resid_post)"))
    print_baseline(res)
    if html:
        path = grid_report(edited or res, f"SelfIE on {m.name}" + (f" with {intervention}" if iv else "")).write(html)
        console.print(f"wrote {path}")


def print_baseline(res) -> None:
    """One line on the random-state baseline, when there is one."""
    summary = res.baseline_summary()
    if summary:
        console.print(f"random-state baseline ({summary['kind']}, {summary['n']} control states): relevancy mean "
                      f"{summary['mean']:.3f}, 95th percentile {summary['q95']:.3f}; real states: mean "
                      f"{summary['real_mean']:.3f}, {100 * summary['share_above_q95']:.0f}% above the percentile")


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
    relevancy: str = typer.Option("signed", help="signed (the treatment effect) | absolute."),
    baseline: str = typer.Option("none", help="none | norm | permute: also interpret a random control per direction."),
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
                               max_new_tokens=max_new_tokens, labels=names, relevancy_form=relevancy,
                               baseline=None if baseline == "none" else baseline)
    print_vector_interpretations(res, f"SelfIE on {path} ({m.name}, k={k}, norm {norm}, {relevancy} relevancy)")
    print_baseline(res)
    if html:
        console.print(f"wrote {sf.grid_report(res, f'SelfIE on {path}').write(html)}")
