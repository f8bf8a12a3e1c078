"""SelfIE commands: ``interpret``, ``interpret-vector`` and ``fit selfie-control`` (apply the file with
``steerlab generate --intervention FILE`` or read its effect with ``steerlab interpret --intervention FILE``)."""

from __future__ import annotations

import typer
from rich.markup import escape

from .app import EXPLAIN, MODEL, app, command, console, fit_app, floats, ints, load_model, names
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

    m = load_model(model)
    iv = load_intervention(intervention, m) if intervention else None
    if alpha is not None and iv is None:
        raise typer.BadParameter("--alpha needs --intervention", param_hint="--alpha")
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
                                                   apply_options={} if alpha is None else {"alpha": alpha})
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


def preserve_texts(texts: list[str], files: list[str]) -> list[str]:
    """The reference texts: each ``--preserve TEXT`` then every text of each ``--preserve-file``."""
    from ..data import load_prompts

    out = list(texts)
    for f in files:
        out += [p.text for p in load_prompts(f)]
    return out


def check_control_input(out: str, prompt: str, target: str, target_vector: str, preserve: list[str]) -> None:
    """Raise a one-line :class:`ControlError` for input that cannot work, before any model is loaded."""
    from pathlib import Path

    from ..explain.selfie_control import ControlError

    if Path(out).is_dir():
        raise ControlError(f"--out {out} is a directory; give a file path such as {out.rstrip('/')}/control.safetensors")
    if not prompt:
        raise ControlError("--prompt is empty: give the source prompt whose state is moved")
    if bool(target) == bool(target_vector):
        raise ControlError("give exactly one of --target (a text whose state is the target) and --target-vector "
                           "(a file holding one d_model vector)")
    if target_vector and not Path(target_vector).is_file():
        raise ControlError(f"--target-vector {target_vector} is not a file")
    if any(not t for t in preserve):
        raise ControlError("a --preserve text is empty")


def read_vector(path: str):
    """One vector from a .safetensors (a single tensor), .pt or .npy file."""
    import numpy as np
    import torch

    from ..explain.selfie_control import ControlError

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise ControlError(f"{path} holds {len(tensors)} tensors; --target-vector needs a file with one")
        v = next(iter(tensors.values()))
    elif path.endswith(".npy"):
        v = torch.from_numpy(np.load(path))
    else:
        v = torch.load(path, map_location="cpu", weights_only=True)
    return torch.as_tensor(v).float().reshape(-1)


@command(fit_app, "selfie-control")
def fit_selfie_control(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file (only the weight deltas + header)."),
    prompt: str = typer.Option(..., "--prompt", help="Source prompt whose hidden state is moved."),
    layer: int = typer.Option(..., "--layer", help="Layer l: the state after block l (blocks.l.resid_post) is moved "
                              "and block l's MLP is edited (negative from the end)."),
    hf_layer: bool = typer.Option(False, "--hf-layer", help="Read --layer and --target-layer in the SelfIE paper's "
                                  "numbering (L = output of block L-1; block L-1's MLP is edited)."),
    target: str = typer.Option("", "--target", help="Target text: its state at --target-layer (default: --layer), "
                               "token --target-token, is where the source state is moved."),
    target_vector: str = typer.Option("", "--target-vector", help="Target vector instead of a text: a .safetensors "
                                      "(one tensor), .pt or .npy file holding d_model numbers."),
    target_layer: int | None = typer.Option(None, "--target-layer", help="Layer the target text's state is read "
                                            "at (the notebooks move a later layer's state into an earlier one)."),
    target_token: int = typer.Option(-1, "--target-token", help="Token of the target text (negative from the end)."),
    token: int = typer.Option(-1, "--token", help="Token of the source prompt whose state is moved (negative "
                              "from the end)."),
    params: str = typer.Option("mlp", "--params", help="mlp: every parameter of the block's MLP (as the SelfIE "
                               "notebooks) | down: its down projection only."),
    preserve: list[str] = typer.Option([], "--preserve", help="Reference text whose states at the layer should "
                                       "stay as they are (repeatable)."),
    preserve_file: list[str] = typer.Option([], "--preserve-file", help="File of reference texts "
                                            "(.txt/.jsonl/.csv; repeatable)."),
    preserve_weight: float = typer.Option(1.0, "--preserve-weight", min=0.0, help="Weight of the preservation "
                                          "term (mean squared change of the reference states)."),
    steps: int = typer.Option(50, "--steps", min=1, help="Adam steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    chat: bool = typer.Option(False, help="Render the prompt, target and references as user turns with the "
                              "chat template."),
    model: str = MODEL,
) -> None:
    """SelfIE supervised control: learn an edit of block l's MLP that moves the state at (--layer,
    --token) of --prompt toward a target state (a text's state at --target-layer, or a vector); prints
    the distance before and after, saves the edit (apply with `generate --intervention FILE [--alpha A]`,
    read its effect with `interpret PROMPT --intervention FILE`)."""
    from ..interventions import fit

    refs = preserve_texts(preserve, preserve_file)
    check_control_input(out, prompt, target, target_vector, refs)
    goal = read_vector(target_vector) if target_vector else target
    m = load_model(model)
    iv = fit("selfie-control", m, prompt, layer=layer, token=token, target=goal, steps=steps, lr=lr,
             preserve=refs or None, preserve_weight=preserve_weight, chat=chat,
             numbering="hf" if hf_layer else "blocks", params=params, target_layer=target_layer,
             target_token=target_token)
    d0, d1 = iv.meta["distance_before"], iv.meta["distance_after"]
    b = iv.meta["block"]
    console.print(f"distance to the target after block {b} (blocks.{b}.resid_post"
                  + (f", the paper's layer {b + 1}" if hf_layer else "") + f"), token {iv.meta['token']}: "
                  f"{d0:.4g} -> {d1:.4g} ({100 * (d1 - d0) / max(d0, 1e-12):+.1f} %, {100 * iv.meta['moved']:.0f}% of "
                  f"the way) after {steps} steps, {params} parameters"
                  + (f", {len(refs)} reference text(s) preserved" if refs else ""))
    iv.save(out)
    console.print(escape(f"saved {iv.describe()} to {out}"))


@command(fit_app, "selfie-rl")
def fit_selfie_rl(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file (only the weight deltas + header)."),
    prompt: list[str] = typer.Option(..., "--prompt", help="Source prompt whose states' interpretations should "
                                     "lose the concept (repeatable; every token's state is used)."),
    layer: int = typer.Option(..., "--layer", help="Layer l: the states after block l are read and block l's MLP "
                              "is fine-tuned (negative from the end)."),
    hf_layer: bool = typer.Option(False, "--hf-layer", help="Read --layer in the SelfIE paper's numbering "
                                  "(L = output of block L-1)."),
    tokens: str = typer.Option("", "--tokens", help="Comma-separated token indices of each prompt whose states are "
                               "used (negative from the end); default: every token."),
    reward: str = typer.Option("scorer:default", "--reward", help="words:WORD,WORD (-1 when an interpretation "
                               "names one, else +1) | scorer:NAME (-1 when its toxicity >= --threshold)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Toxicity at which a scorer reward is -1."),
    estimator: str = typer.Option("paper", "--estimator", help="paper: the notebook's surrogate (each state moved "
                                  "along itself by its reward) | gaussian: REINFORCE with Gaussian draws."),
    sigma: float = typer.Option(0.1, "--sigma", help="gaussian: draw scale, relative to each state's norm."),
    samples: int = typer.Option(4, "--samples", min=1, help="gaussian: draws per state and step."),
    steps: int = typer.Option(10, "--steps", min=1, help="Adam steps."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    params: str = typer.Option("mlp", "--params", help="mlp: every parameter of the block's MLP | down: its down "
                               "projection only."),
    template: str = typer.Option("", help="Interpretation prompt, each [X] one placeholder token (default: "
                                 "interpret's)."),
    plain: bool = typer.Option(False, help="Do not wrap the interpretation prompt in the chat template."),
    k: int = typer.Option(1, "-k", help="Inject before decoder block k."),
    max_new_tokens: int = typer.Option(20, min=1, help="Greedy tokens per interpretation."),
    preserve: list[str] = typer.Option([], "--preserve", help="Reference text whose states at the layer should "
                                       "stay as they are (repeatable)."),
    preserve_file: list[str] = typer.Option([], "--preserve-file", help="File of reference texts (repeatable)."),
    preserve_weight: float = typer.Option(1.0, "--preserve-weight", min=0.0, help="Weight of the preservation term."),
    chat: bool = typer.Option(False, help="Render the prompts and references as user turns with the chat template."),
    model: str = MODEL,
) -> None:
    """SelfIE reinforcement control: fine-tune block l's MLP so that the interpretations of the states
    after it (every token of the --prompt texts) no longer carry a concept, rewarded from the
    interpretation text; prints the share of interpretations carrying it before and after, saves the
    edit (apply with `generate --intervention FILE`, read with `interpret PROMPT --intervention FILE`)."""
    from ..explain.selfie import interpretation_prompt, parse_parts
    from ..explain.selfie_control import ControlError
    from ..explain.selfie_rl import reward_from_spec
    from ..interventions import fit

    refs = preserve_texts(preserve, preserve_file)
    if any(not p for p in prompt):
        raise ControlError("a --prompt is empty")
    if not reward.startswith("scorer:"):
        reward_from_spec(reward)  # a bad word list or an unknown kind fails before the model loads
    m = load_model(model)
    ip = interpretation_prompt(m, parse_parts(template) if template else None, chat=False if plain else None)
    iv = fit("selfie-rl", m, list(prompt), layer=layer, reward=reward, threshold=threshold, estimator=estimator,
             sigma=sigma, samples=samples, steps=steps, lr=lr, params=params, interpretation=ip, k=k,
             max_new_tokens=max_new_tokens, preserve=refs or None, preserve_weight=preserve_weight, chat=chat,
             numbering="hf" if hf_layer else "blocks", tokens=ints(tokens, "--tokens") or None)
    meta = iv.meta
    console.print(f"interpretations of the {meta['n_states']} states after block {meta['block']} carrying the "
                  f"concept ({reward}): {100 * meta['carrying_before']:.0f}% -> {100 * meta['carrying_after']:.0f}% "
                  f"after {steps} steps ({estimator} estimator); per step: "
                  + " ".join(f"{100 * c:.0f}%" for c in meta["carrying"]))
    iv.save(out)
    console.print(escape(f"saved {iv.describe()} to {out}"))
