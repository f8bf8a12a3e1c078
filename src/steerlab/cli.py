"""The ``steerlab`` command line."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import SteerlabError

app = typer.Typer(
    help="steerlab: explain and steer large language models from the inside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# rich assumes 80 columns when stdout is not a terminal; tables are more readable wider
console = Console() if sys.stdout.isatty() else Console(width=130)

MODEL_HELP = ("Model: 'default' (embedded SmolLM2-135M-Instruct), an embedded name (see `steerlab models`), "
              "a .gguf file, a local model directory, or a hub id.")


@app.callback()
def _global(
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads for any command (0: torch's choice, "
                                "one per core). On a machine shared with other jobs, 1 can be much faster."),
) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


DEVICE_HELP = ("Device for the model (cpu, cuda, cuda:1, mps); in a data-parallel launch (accelerate launch) "
               "cuda means each process's own GPU.")
DEVICE_MAP_HELP = ("Spread the model over the available devices with this transformers device_map (e.g. auto, "
                   "needs accelerate), for a model larger than one device; replaces --device.")


def _load(spec: str, dtype: str = "float32", device: str = "cpu", device_map: str = ""):
    from .models import load
    from .parallel import group

    with console.status(f"loading {spec} ..."):
        return load(spec, dtype=dtype, device=group().device(device), device_map=device_map or None)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
    raise typer.Exit(2)


def command(group: typer.Typer, *args, **kwargs):
    """Register a command on ``group`` whose steerlab errors (bad input, files, models) end in one
    line on the terminal and exit code 2, never a traceback: the one CLI error handler."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except SteerlabError as e:
                _fail(e)

        return group.command(*args, **kwargs)(run)

    return deco


def print_lens(lens, title: str) -> None:
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("layer", justify="right", style="bold")
    k = len(lens.top[0])
    for j in range(k):
        t.add_column(f"top {j + 1}")
    for name, row in zip(lens.layers, lens.top):
        t.add_row(name, *[f"{tok!r} {p:.2f}" for tok, p in row])
    console.print(t)


@command(app)
def lens(
    prompt: str = typer.Argument(..., help="Text whose next-token prediction is read at each layer."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    k: int = typer.Option(5, "--top", "-k", min=1, help="Tokens shown per layer."),
    layers: str = typer.Option("", help="Comma-separated layer indices (negative count from the end); default all."),
    chat: bool = typer.Option(False, help="Render the prompt as a user turn with the chat template."),
) -> None:
    """Logit lens: the top next tokens (with probabilities) the model would predict after each layer."""
    from .explain.lens import layer_lens

    m = _load(model)
    idx = _ints(layers, "--layers") or None
    res = layer_lens(m, prompt, k=k, layers=idx, chat=chat)
    print_lens(res, f"logit lens of {m.name} on {prompt!r} (last token; rows: after block l)")


@command(app)
def interpret(
    prompt: str = typer.Argument(..., help="Original prompt whose hidden states the model describes."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
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
    from .explain.selfie import grid_report, interpret, interpretation_prompt, parse_parts, spread_layers
    from .interventions import load as load_intervention

    m = _load(model)
    iv = load_intervention(intervention, m) if intervention else None
    if alpha is not None and iv is None:
        raise typer.BadParameter("--alpha needs --intervention", param_hint="--alpha")
    ls = _ints(layers, "--layers") or spread_layers(m)
    ts = _ints(tokens, "--tokens") or [-1]
    parts = parse_parts(template) if template else None
    ip = interpretation_prompt(m, parts, chat=False if plain else None)
    kw = dict(k=k, mode=mode, strength=strength, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat)
    pairs = [(L, t) for L in ls for t in ts]
    res = interpret(m, prompt, pairs, ip, **kw)
    edited = None if iv is None else interpret(m, prompt, pairs, ip, **kw, intervention=iv,
                                               apply_options={} if alpha is None else {"alpha": alpha})
    _print_interpretations(res, edited, f"SelfIE on {m.name}: {prompt!r} (k={k}, {mode})", intervention)
    if html:
        path = grid_report(edited or res, f"SelfIE on {m.name}" + (f" with {intervention}" if iv else "")).write(html)
        console.print(f"wrote {path}")


def _print_interpretations(res, edited, title: str, label: str) -> None:
    t = Table(title=title, title_justify="left")
    cols = [("layer", "right"), ("token", "right"), ("token text", "left"), ("interpretation", "left"),
            ("relevancy", "right")]
    if edited is not None:
        cols += [(f"with {label.rsplit('/', 1)[-1]}", "left"), ("relevancy ", "right")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for i, r in enumerate(res.rows):
        more = [] if edited is None else [edited.rows[i].text, f"{edited.rows[i].relevancy:.3f}"]
        t.add_row(str(r.layer), str(r.token), repr(r.token_text), r.text, f"{r.relevancy:.3f}", *more)
    console.print(t)


@command(app, "interpret-vector")
def interpret_vector(
    path: str = typer.Argument(..., help="A saved steering vector (.safetensors from `steerlab fit steering`)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
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

    from .explain import selfie as sf
    from .interventions import load as load_intervention

    m = _load(model)
    iv = load_intervention(path, m, strict=False)
    dirs = getattr(iv, "directions", None)
    if not dirs:
        raise sf.SelfieError(f"{path} holds a {iv.method!r} intervention, not a steering vector with directions")
    names = [x.strip() for x in sites.split(",") if x.strip()] or list(dirs)
    missing = [x for x in names if x not in dirs]
    if missing:
        raise sf.SelfieError(f"site {missing[0]!r} is not in {path}; it has {', '.join(dirs)}")
    scale = None if norm == "none" else (norm if norm == "typical" else _floats(norm, "--norm")[0])
    ip = sf.interpretation_prompt(m, sf.parse_parts(template) if template else None, chat=False if plain else None)
    res = sf.interpret_vectors(m, torch.stack([dirs[x] for x in names]), ip, k=k, norm=scale,
                            max_new_tokens=max_new_tokens, labels=names)
    t = Table(title=f"SelfIE on {path} ({m.name}, k={k}, norm {norm})", title_justify="left")
    for col in ("site", "interpretation", "relevancy"):
        t.add_column(col, justify="right" if col == "relevancy" else "left")
    for r in res.rows:
        t.add_row(r.token_text, r.text, f"{r.relevancy:.3f}")
    console.print(t)
    if html:
        console.print(f"wrote {sf.grid_report(res, f'SelfIE on {path}').write(html)}")


@command(app)
def models() -> None:
    """List the embedded models and supported architectures."""
    from .models import ARCHS, EMBEDDED

    t = Table(title="embedded models")
    t.add_column("name")
    t.add_column("what")
    for name, (_, desc) in EMBEDDED.items():
        t.add_row(name, desc)
    console.print(t)
    console.print("architectures with adapters: " + ", ".join(sorted(ARCHS)))


@command(app)
def info(model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP)) -> None:
    """Shape facts, fingerprint and source of a model."""

    m = _load(model)
    t = Table(title=m.name, show_header=False)
    for k_, v in [("source", m.source), ("fingerprint", m.fingerprint), ("architecture", m.arch.name),
                  ("layers", m.n_layers), ("d_model", m.d_model), ("heads", f"{m.n_heads} (kv {m.n_kv_heads}) x {m.d_head}"),
                  ("d_mlp", m.d_mlp), ("vocab", m.vocab_size), ("tied unembedding", m.tied()),
                  ("chat template", "yes" if m.chat_template else "no")]:
        t.add_row(k_, str(v))
    console.print(t)


def select_prompts(spec: str, split_name: str | None, n: int | None, seed: int = 0) -> list:
    """Prompts from a spec (bundled name, file, hf:...), optionally one part of the seeded split
    by prompt (train / validation / test), then the first ``n``."""
    from .data import load_prompts, split, take

    prompts = load_prompts(spec)
    if split_name:
        parts = split(prompts, seed=seed)
        if split_name not in parts:
            raise typer.BadParameter(f"unknown split {split_name!r}; choose one of {', '.join(parts)}")
        prompts = parts[split_name]
    return take(prompts, n) if n else prompts


def print_summary(summary: dict, title: str) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for name, e in summary["toxicity"].items():
        if isinstance(e, dict):
            t.add_row(name.replace("_", " "), f"{e['value']:.3f}", f"[{e['lo']:.3f}, {e['hi']:.3f}]")
    for name, v in summary.get("diversity", {}).items():
        t.add_row(name, f"{v:.3f}", "")
    if "perplexity" in summary.get("fluency", {}):
        t.add_row(f"perplexity ({summary['fluency']['reference_model']})", f"{summary['fluency']['perplexity']:.2f}", "")
    console.print(t)


@command(app)
def generate(
    out: str = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning the same command resumes it)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    prompts: str = typer.Option("rtp", "--prompts", "-p", help="Prompt set: rtp, rtp:<category>, donotanswer, "
                                "harmbench, neutral, a .txt/.jsonl/.csv file, or hf:<dataset>[:split][:field]."),
    split_name: str = typer.Option("", "--split", help="Keep one part of the seeded split by prompt: train, "
                                   "validation or test (60/20/20)."),
    n: int = typer.Option(0, "--n", min=0, help="Keep the first N prompts (0: all; the split is already "
                          "shuffled, stratified by category)."),
    k: int = typer.Option(1, "-k", min=1, help="Samples per prompt (k > 1 needs a sampling preset)."),
    sampling: str = typer.Option("greedy", help="greedy | t0.7 (T=0.7, top_p=0.9) | t1.0 (T=1.0, top_p=0.95)."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    chat: bool = typer.Option(False, help="Render prompts as user turns with the chat template (default: raw completion)."),
    batch_size: int = typer.Option(16, min=1, help="Rows (prompt x sample) per generate call."),
    seed: int = typer.Option(0, help="Sampling seed (also the split seed)."),
    scorer: str = typer.Option("default", help="Toxicity scorer for the continuations, or 'none'. See `steerlab scorers`; "
                               "NAME:VALUE sets its main argument (hf-classifier:MODEL, detoxify:CHECKPOINT)."),
    scorer_option: list[str] = typer.Option([], "--scorer-option", help="KEY=VALUE passed to the scorer "
                                            "(repeatable), e.g. model=PATH for hf-classifier; or --scorer NAME:VALUE."),
    fluency: bool = typer.Option(True, help="Also compute the perplexity of the continuations (given their prompts)."),
    fluency_model: str = typer.Option("", help="Reference model for that perplexity (any --model spec; default: "
                                      "the generating model itself, unedited)."),
    intervention: str = typer.Option("", "--intervention", "-i", help="Apply a saved intervention (from "
                                     "`steerlab fit METHOD`) while generating; fluency is still measured unedited."),
    alpha: float | None = typer.Option(None, help="Strength passed to the intervention's apply (steering: the "
                                       "multiple of the saved direction)."),
    apply_option: list[str] = typer.Option([], "--apply-option", help="KEY=VALUE passed to the intervention's "
                                           "apply (repeatable), e.g. mode=ablate or where=generated for steering."),
    overwrite: bool = typer.Option(False, help="Start the run directory afresh."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    device_map: str = typer.Option("", "--device-map", help=DEVICE_MAP_HELP),
) -> None:
    """Generate continuations of a prompt set into a run directory, score their toxicity and print
    expected maximum toxicity, toxicity probability and mean toxicity with bootstrap CIs. With
    --intervention, the same prompts, decoding, scorer and metrics evaluate any saved intervention.
    Under `accelerate launch --num_processes N` the processes share the prompts (one run directory)."""
    from pathlib import Path

    from .evaluation import summarize
    from .generation import GenConfig, generate_run
    from .interventions import load as load_intervention
    from .parallel import group
    from .runs import write_json
    from .scoring import scorer_from_spec

    # everything is validated and loaded before the run directory is created
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling=sampling, k=k, seed=seed, chat=chat,
                    batch_size=batch_size)
    ps = select_prompts(prompts, split_name or None, n or None, seed)
    sc = None if scorer == "none" else scorer_from_spec(scorer, scorer_option)
    m = _load(model, device=device, device_map=device_map)
    iv = load_intervention(intervention, m) if intervention else None
    if (alpha is not None or apply_option) and iv is None:
        raise typer.BadParameter("--alpha and --apply-option need --intervention", param_hint="--alpha")
    opts = _key_values(apply_option, "--apply-option")
    if alpha is not None:
        opts["alpha"] = alpha
    ref = (_load(fluency_model) if fluency_model else m) if fluency and sc is not None else None
    rows = generate_run(m, ps, out, cfg, scorer=sc, intervention=iv,
                        apply_options=opts, overwrite=overwrite,
                        extra_config={"prompts": prompts, "split": split_name, "n": n})
    if not group().main:  # a data-parallel launch: rank 0 reports
        return
    console.print(f"{len(rows)} continuations in {out}/results.jsonl")
    if sc is not None:
        summary = summarize(rows, fluency_model=ref, chat=chat)
        if ref is None:  # metrics are recomputed on every call: say so when fluency was left out
            summary["fluency"] = {"computed": False, "why": "--no-fluency"}
        write_json(Path(out) / "metrics.json", summary)
        print_summary(summary, f"{m.name} on {prompts} ({len(ps)} prompts x {k}, {sampling}, scorer {sc.name})")


@command(app)
def score(
    inputs: str = typer.Argument(..., help="Texts to score: a .txt (one per line), .jsonl or .csv file."),
    scorer: str = typer.Option("default", help="Scorer name (see `steerlab scorers`), or NAME:VALUE."),
    scorer_option: list[str] = typer.Option([], "--scorer-option", help="KEY=VALUE passed to the scorer "
                                            "(repeatable), e.g. model=PATH for hf-classifier; or --scorer NAME:VALUE."),
    field: str = typer.Option("", help="Field/column holding the text in .jsonl/.csv (default: text, prompt; "
                              "use 'continuation' for a generate run's results.jsonl)."),
    out: str = typer.Option("", "--out", "-o", help="Write one JSON row per text (text + every attribute) here."),
) -> None:
    """Score texts with a toxicity scorer; prints the mean and the share >= 0.5 of each attribute."""
    if out:
        check_out_file(out)

    import numpy as np

    from .data import load_prompts
    from .scoring import scorer_from_spec

    items = load_prompts(inputs, field=field or None)
    sc = scorer_from_spec(scorer, scorer_option)
    texts = [p.text for p in items]
    res = sc.score(texts)
    if out:
        from .runs import write_jsonl

        write_jsonl(out, [{"text": t, **{a: float(v[i]) for a, v in res.items()}} for i, t in enumerate(texts)])
    t = Table(title=f"{sc.name} on {len(texts)} texts from {inputs}", title_justify="left")
    for c in ("attribute", "mean", "share >= 0.5", "max"):
        t.add_column(c, justify="right" if c != "attribute" else "left")
    for a, v in res.items():
        t.add_row(a, f"{np.mean(v):.3f}", f"{np.mean(v >= 0.5):.3f}", f"{np.max(v):.3f}")
    console.print(t)


@command(app)
def scorers() -> None:
    """List the registered toxicity scorers."""
    from .scoring import DEFAULT_SCORER, list_scorers

    for name in list_scorers():
        console.print(f"{name}{'  (= ' + DEFAULT_SCORER + ')' if name == 'default' else ''}")


steer_app = typer.Typer(help="Steering vectors: fit, sweep layers x strengths, export to llama.cpp.",
                        no_args_is_help=True)
app.add_typer(steer_app, name="steer")


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s", param_hint=option) from None


def _ints(text: str, option: str = "--layers") -> list[int]:
    return _numbers(text, int, option)


def _floats(text: str, option: str = "--alphas") -> list[float]:
    return _numbers(text, float, option)


fit_app = typer.Typer(help="Fit an intervention and save it (safetensors + JSON header); apply it with "
                      "`steerlab generate --intervention FILE`. Methods: `steerlab interventions`.",
                      no_args_is_help=True)
app.add_typer(fit_app, name="fit")


def _key_values(items: list[str], option: str) -> dict:
    from .scoring import parse_option_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key.strip().replace("-", "_")] = parse_option_value(value)
    return out


def check_out_file(out: str) -> None:
    from pathlib import Path

    if Path(out).is_dir():
        raise typer.BadParameter(f"{out} is a directory; give a file path such as {out.rstrip('/')}/v.safetensors",
                                 param_hint="--out")


def fit_steering(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    desirable: str = typer.Option("", help="File of desirable texts (.txt/.jsonl/.csv)."),
    undesirable: str = typer.Option("", help="File of undesirable texts."),
    prompts: str = typer.Option("rtp", help="Without --desirable/--undesirable: rank the training split of this "
                                "prompt set by toxicity and pair the least toxic with the most toxic."),
    n_pairs: int = typer.Option(64, min=1, help="Contrast pairs taken from the ranked prompts."),
    layers: str = typer.Option("", help="Comma-separated layers (default: all); sites blocks.{l}.resid_post."),
    method: str = typer.Option("mean_diff", help="Direction fitter: mean_diff | pca | probe."),
    positions: str = typer.Option("mean_skip_first", help="last | mean | mean_skip_first (mean without each "
                                  "text's first token, whose attention-sink state dominates a mean) | aligned."),
    scale: str = typer.Option("unit", help="unit | raw."),
    scorer: str = typer.Option("default", help="Scorer that ranks prompts (when building the contrast set), or NAME:VALUE."),
    scorer_option: list[str] = typer.Option([], "--scorer-option", help="KEY=VALUE passed to the scorer "
                                            "(repeatable), e.g. model=PATH for hf-classifier; or --scorer NAME:VALUE."),
    seed: int = typer.Option(0, help="Seed of the train/validation/test split the contrast set comes from."),
) -> None:
    """Fit a steering vector (one direction per layer) from contrast texts and save it."""
    from .data import ContrastSet, load_prompts
    from .scoring import scorer_from_spec
    from .steer import SteeringVector
    from .steer.vector import FIT_METHODS, toxicity_contrast

    check_out_file(out)
    idx = _ints(layers)
    if method not in FIT_METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose one of {', '.join(FIT_METHODS)}",
                                 param_hint="--method")
    if desirable or undesirable:
        data = ContrastSet([p.text for p in load_prompts(desirable)] if desirable else [],
                           [p.text for p in load_prompts(undesirable)] if undesirable else [])
    else:
        data = toxicity_contrast(prompts, scorer_from_spec(scorer, scorer_option), n_pairs, seed)
    m = _load(model)
    sites = [f"blocks.{i}.resid_post" for i in (idx or range(m.n_layers))]
    sv = SteeringVector.fit(m, data, sites=sites, method=method, positions=positions, scale=scale)
    sv.save(out)
    console.print(f"saved {len(sv.directions)} directions ({method}, {positions}, {scale}) from "
                  f"{len(data.desirable)} desirable / {len(data.undesirable)} undesirable texts to {out}")


command(fit_app, "steering")(fit_steering)
command(steer_app, "fit")(fit_steering)


@command(fit_app, "selfcorrect")
def fit_selfcorrect(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    instruction: str = typer.Option("strong_detox", help="Correction instruction (`steerlab selfcorrect "
                                    "--list-instructions`)."),
    opening: str = typer.Option("opening", help="Opening instruction of the dialogue."),
) -> None:
    """Self-correction prompting: one "please revise" round after each continuation (nothing is learned;
    the file records the instruction texts and the model)."""
    from .interventions import fit

    check_out_file(out)
    iv = fit("selfcorrect", _load(model), None, instruction=instruction, opening=opening)
    iv.save(out)
    console.print(f"saved {iv.describe()} to {out}")


def _training_prompts(prompts: str, n_prompts: int, seed: int) -> list:
    """The first ``n_prompts`` of the training part of the seeded split (what detox fits learn from)."""
    from .data import load_prompts, split

    train = split(load_prompts(prompts), seed=seed)["train"]
    return train[:n_prompts] if n_prompts else train


@command(fit_app, "eigenshift")
def fit_eigenshift(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    prompts: str = typer.Option("rtp", help="Prompt set whose training split (seeded 60/20/20) is generated from."),
    n_prompts: int = typer.Option(200, min=0, help="Training prompts to generate from (0: all)."),
    samples: int = typer.Option(4, min=1, help="Continuations per prompt."),
    sampling: str = typer.Option("t1.0", help="Decoding of the collection: greedy | t0.7 | t1.0."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    percentile: float = typer.Option(0.999, help="k = ceil(d (1 - percentile)) directions are dampened."),
    k: int = typer.Option(0, min=0, help="Dampen exactly k directions (overrides --percentile; 0: use it)."),
    alpha: float = typer.Option(0.1, help="Dampened singular values become alpha x s_i (0: removed)."),
    rank: str = typer.Option("abs", help="abs: largest |delta| (sign-free) | signed: largest delta (the paper)."),
    scorer: str = typer.Option("default", help="Scorer labelling the continuations."),
    threshold: float = typer.Option(0.5, help="Toxic when the scorer gives >= threshold."),
    saliency: str = typer.Option("auto", help="auto | bilstm | lexicon: how toxic words are found."),
    min_states: int = typer.Option(8, min=1, help="Fewest toxic (and non-toxic) states accepted."),
    batch_size: int = typer.Option(16, min=1, help="Rows per generate call."),
    seed: int = typer.Option(0, help="Split and sampling seed."),
    figures: str = typer.Option("", help="Also write the delta figure and the dampened directions' tokens here."),
) -> None:
    """EigenShift: generate from training prompts, collect toxic / non-toxic final states, dampen the
    unembedding's singular directions that separate them, save the edit."""
    from .generation import GenConfig
    from .steer.eigenshift import EigenShift

    check_out_file(out)
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling=sampling, k=samples, seed=seed, batch_size=batch_size)
    m = _load(model)
    iv = EigenShift.fit(m, _training_prompts(prompts, n_prompts, seed), percentile=percentile, alpha=alpha,
                        k=k or None, rank=rank, min_states=min_states, cfg=cfg, scorer=scorer,
                        threshold=threshold, saliency=saliency)
    iv.save(out)
    st = iv.meta["stats"]
    console.print(f"{st['continuations']} continuations ({st['toxic_continuations']} toxic): {st['toxic_states']} "
                  f"toxic and {st['nontoxic_states']} non-toxic states ({st['saliency']} saliency)")
    console.print(escape(f"saved {iv.describe()}: directions {iv.indices.tolist()[:12]} to {out}"))
    if figures:
        from .steer.eigenshift_report import report

        for p in report(m, iv, figures):
            console.print(f"wrote {p}")


@command(fit_app, "aura")
def fit_aura(
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    variant: str = typer.Option("aura", help="aura (factor 1 - 2 (AUROC - 0.5)) | damp (0.5) | det0 (0) for the top N."),
    top_n: int = typer.Option(0, min=0, help="Units dampened by damp / det0 (0: 1% of all MLP units)."),
    prompts: str = typer.Option("rtp", help="Prompt set whose training split (seeded 60/20/20) is generated from."),
    n_prompts: int = typer.Option(200, min=0, help="Training prompts to generate from (0: all)."),
    samples: int = typer.Option(2, min=1, help="Continuations per prompt."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    scorer: str = typer.Option("default", help="Scorer labelling prompt + continuation."),
    threshold: float = typer.Option(0.5, help="Toxic when the scorer gives >= threshold."),
    min_texts: int = typer.Option(8, min=1, help="Fewest toxic (and non-toxic) texts accepted."),
    seed: int = typer.Option(0, help="Split and sampling seed."),
) -> None:
    """AurA: generate from training prompts, score prompt + continuation, rank every MLP unit by its
    AUROC as a toxicity detector and save the per-unit factors."""
    from .generation import GenConfig
    from .steer.aura import VARIANTS, AurA, texts_from_generations

    check_out_file(out)
    if variant not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}",
                                 param_hint="--variant")
    m = _load(model)
    cfg = GenConfig(max_new_tokens=max_new_tokens, sampling="t1.0", k=samples, seed=seed)
    data = texts_from_generations(m, _training_prompts(prompts, n_prompts, seed), cfg, scorer, threshold)
    iv = AurA.fit(m, data, variant=variant, top_n=top_n or None, min_texts=min_texts)
    iv.save(out)
    console.print(f"{len(data[1])} toxic and {len(data[0])} non-toxic texts; {iv.meta['units_dampened']} units "
                  f"dampened over {len(iv.sites)} layers")
    console.print(escape(f"saved {iv.describe()} to {out}"))


@command(app)
def interventions() -> None:
    """List the registered intervention methods (fit with `steerlab fit METHOD`)."""
    from .interventions import list_interventions

    t = Table(title="registered interventions")
    t.add_column("method")
    t.add_column("what")
    for name, doc in list_interventions().items():
        t.add_row(name, doc)
    console.print(t)


@command(steer_app, "export-gguf")
def steer_export(
    vector: str = typer.Argument(..., help="A steering vector saved by `steerlab steer fit`."),
    out: str = typer.Argument(..., help="Output .gguf control vector for llama.cpp (--control-vector)."),
) -> None:
    """Export the resid_post directions of a vector as a llama.cpp control vector."""
    check_out_file(out)
    from .steer import SteeringVector

    path = SteeringVector.load(vector).to_gguf(out)
    console.print(f"wrote {path}")


@command(steer_app, "study")
def steer_study(
    out: str = typer.Option(..., "--out", "-o", help="Run directory (rerun to resume)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
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
    from .experiments.steering import SteeringStudy, run_steering_study

    m = _load(model)
    st = SteeringStudy(prompts=prompts, layers=_ints(layers), alphas=_floats(alphas), n_pairs=n_pairs,
                       n_sweep=n_sweep, k_sweep=k_sweep, max_ppl_ratio=max_ppl_ratio,
                       min_distinct_ratio=min_distinct_ratio, refine_top=refine_top, k_refine=k_refine,
                       n_test=n_test, k_test=k_test, max_new_tokens=max_new_tokens, where=where,
                       positions=positions, method=method, scorer=scorer, seed=seed,
                       variants=[v.strip() for v in variants.split(",") if v.strip()], fractions=_floats(fractions, "--fractions"),
                       max_kl=max_kl, n_neutral=n_neutral, pareto=pareto)
    metrics = run_steering_study(m, out, st)
    ch = metrics["chosen"]
    if ch["site"] is None:
        console.print("no validation cell satisfies the selection rule; only the unsteered arm and the trade-off "
                      f"points were evaluated (see {out}/figures/pareto.png)")
    head = "no setting chosen" if ch["site"] is None else (f"{ch['variant']} at {ch['site']}, alpha {ch['alpha']:g} "
                                                          f"x {ch['typical_norm']:.0f}")
    t = Table(title=f"{m.name}: held-out test ({metrics['n_test_prompts']} prompts x {metrics['k']}), {head}",
              title_justify="left")
    for c in ("intervention", "mean toxicity [95% CI]", "expected max tox.", "tox. probability", "perplexity",
              "distinct-2", "neutral ppl", "neutral KL"):
        t.add_column(c)
    for name, r in metrics["test"].items():
        tx = r["toxicity"]
        mt = tx["mean_toxicity"]
        se = r.get("side_effects", {})
        t.add_row(name, f"{mt['value']:.3f} [{mt['lo']:.3f}, {mt['hi']:.3f}]",
                  f"{tx['expected_max_toxicity']['value']:.3f}", f"{tx['toxicity_probability']['value']:.3f}",
                  f"{r.get('fluency', {}).get('perplexity', float('nan')):.1f}", f"{r['diversity']['distinct-2']:.3f}",
                  f"{se.get('neutral_perplexity', float('nan')):.1f}", f"{se.get('kl_from_unedited', float('nan')):.3f}")
    console.print(t)
    if "pareto" in metrics:
        met = [p["arm"] for p in metrics["pareto"]["points"] if p["target"]["met"]]
        console.print(f"trade-off points meeting the target on test: {', '.join(met) if met else 'none'}")
    console.print(f"figures: {out}/figures/sweep_*.png, {out}/figures/test_toxicity.png, {out}/figures/pareto.png")


def _print_selfcorrect(name: str, h: dict, rounds: int) -> None:
    """The toxicity-per-round and first-shift cosine tables of a self-correction run."""
    groups = h.get("groups") or [g for g in ("detox", "toxify") if g in h]
    t = Table(title=f"{name}: toxicity per round, mean ± std ("
                    + ", ".join(f"{g}: {h[g]['instruction']}" for g in groups) + ")", title_justify="left")
    t.add_column("group")
    for r in range(rounds):
        t.add_column(f"round {r + 1}", justify="right")
    t.add_column("moved as instructed", justify="right")
    for g in groups:
        gh = h[g]
        t.add_row(f"{g} (n={gh['n']})", *[f"{mu:.3f} ± {sd:.3f}" for mu, sd in zip(gh["toxicity_mean"], gh["toxicity_std"])],
                  str(gh["moved_as_instructed"]))
    console.print(t)
    L = len(h[groups[0]]["first_shift_cos_by_layer"])
    shown = sorted({*range(0, L, max(1, L // 6)), L - 1})
    t = Table(title="cosine of the round 1→2 shift with the layer's steering vector (resid_post, last prompt "
                    "token; + = towards non-toxic); controls for the detox shift (others: tables/steering_cosine.csv)",
              title_justify="left")
    t.add_column("layer", justify="right")
    cols = [*groups, *h.get("contrasts", [])]
    for g in cols:
        t.add_column(g.replace("-", " − ") if g in h.get("contrasts", []) else g, justify="right")
    t.add_column("random ± std", justify="right")
    t.add_column("permuted", justify="right")
    ref = h[groups[0]]
    for layer in shown:
        t.add_row(str(layer), *[f"{h[g]['first_shift_cos_by_layer'][layer]:+.3f}" for g in cols],
                  f"{ref['first_shift_random_cos'][layer]:+.3f} ± {ref['first_shift_random_std'][layer]:.3f}",
                  f"{ref['first_shift_permuted_cos'][layer]:+.3f}")
    console.print(t)
    paper = [g for g in cols if "first_shift_paper_stat_by_layer" in h[g]]
    if paper:
        t = Table(title="the paper's statistic: mean per-sample cosine of the round 1→2 shift of the final-norm "
                        "response mean with s_l (best layers and max-over-layers p-values: "
                        "tables/steering_best_layer.csv)", title_justify="left")
        t.add_column("layer", justify="right")
        for g in paper:
            t.add_column(g, justify="right")
        for layer in shown:
            t.add_row(str(layer), *[f"{h[g]['first_shift_paper_stat_by_layer'][layer]:+.3f}" for g in paper])
        console.print(t)


@command(app)
def selfcorrect(
    out: str = typer.Option("runs/selfcorrect", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    prompts: str = typer.Option("rtp", help="Prompt pool: rtp, rtp:<category>, a .txt/.jsonl/.csv file or hf:<id>."),
    preset: str = typer.Option("small", help="small (48 prompts, 3 rounds, 40 tokens: minutes on 2 CPU cores), "
                               "paper (200 prompts, 5 rounds, 150 tokens), tiny (smoke test), crossed or "
                               "robustness (24 prompts, every prompt gets every instruction of --arms)."),
    n: int | None = typer.Option(None, help="Samples (split between detox and toxify groups); default from --preset."),
    rounds: int | None = typer.Option(None, min=2, help="Dialogue rounds (1 completion + corrections); default from --preset."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="New tokens per reply; default from --preset."),
    directions: str = typer.Option("both", help="both | detox (toxic prompts only) | toxify (non-toxic prompts only)."),
    selection: str = typer.Option("threshold", help="threshold: random prompts on each side of toxicity 0.5; "
                                  "rank: the most and least toxic prompts."),
    detox: str = typer.Option("strong_detox", help="Correction instruction for toxic prompts."),
    toxify: str = typer.Option("strong_toxify", help="Correction instruction for non-toxic prompts."),
    opening: str = typer.Option("opening", help="Round-1 instruction (its text holds {prompt})."),
    instructions: str | None = typer.Option(None, help="JSON file of extra or replacement instructions "
                                            '({"kind": "text"} or {"kind": {"text": ..., "direction": ...}}).'),
    list_instructions: bool = typer.Option(False, "--list-instructions", help="Print the instruction kinds and exit."),
    sampling: str = typer.Option("t0.7", help="Sampling preset: t0.7 (T=0.7, top_p=0.9), t1.0 or greedy."),
    seed: int = typer.Option(0, help="Seed of prompt selection and sampling."),
    batch_size: int = typer.Option(16, min=1, help="Dialogues per generate call."),
    scorer: str = typer.Option("default", help="Toxicity scorer (see `steerlab scorers`)."),
    steer_pairs: int | None = typer.Option(None, min=1, help="Contrast pairs for the per-layer steering vectors "
                                           "(default from --preset: 64, tiny 16)."),
    steer_positions: str = typer.Option("mean_skip_first", help="Steering-vector positions: last | mean | "
                                        "mean_skip_first | aligned."),
    arms: str | None = typer.Option(None, help="Crossed design: every prompt gets every instruction of this set: "
                                    "crossed (strong detox, strong toxify, neutral rewrite), robustness (strong and "
                                    "weak of both, neutral) or comma-separated kinds; default from --preset."),
    n_null: int | None = typer.Option(None, min=1, help="Label-shuffled steering vectors for the null (default 100)."),
    overwrite: bool = typer.Option(False, help="Start the run directory afresh instead of resuming."),
) -> None:
    """Intrinsic self-correction study (arXiv 2505.11924): multi-round detox/toxify dialogues,
    toxicity and hidden states per round, logit-lens relation, PCA of the moves, and the cosine
    of each round's shift with per-layer toxicity steering vectors. Writes tables, figures and
    report.html into --out."""
    from .experiments.selfcorrect import make_config, run_selfcorrect
    from .protocols.selfcorrect import get_instruction, instruction_kinds, load_instructions

    if instructions:
        load_instructions(instructions)
    if list_instructions:
        t = Table(title="self-correction instructions")
        for c in ("kind", "direction", "text"):
            t.add_column(c)
        for kind in instruction_kinds():
            inst = get_instruction(kind)
            t.add_row(kind, inst.direction, inst.text)
        console.print(t)
        return
    cfg = make_config(preset, prompts=prompts, n=n, rounds=rounds, max_new_tokens=max_new_tokens,
                      directions=directions, selection=selection, detox=detox, toxify=toxify, opening=opening,
                      sampling=sampling, seed=seed, batch_size=batch_size, scorer=scorer,
                      steer_pairs=steer_pairs, steer_positions=steer_positions, arms=arms, n_null=n_null)
    cfg.validate()
    m = _load(model)
    res = run_selfcorrect(m, out, cfg, overwrite=overwrite)
    h = res.headline
    _print_selfcorrect(m.name, h, cfg.rounds)
    console.print(f"generation {h.get('generation_seconds', '?')} s over all rounds, this call "
                  f"{h.get('seconds_this_call', '?')} s; report: {res.path / 'report.html'}")


@command(app)
def bench(
    out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory (rerunning the same command resumes it)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    preset: str = typer.Option("quick", help="quick (every method on the default model in minutes on 2 CPU cores), "
                               "standard, or full (the papers' 25 samples per prompt; for a GPU)."),
    methods: str = typer.Option("", help="Comma-separated intervention methods (default: every registered one; "
                                "see `steerlab interventions`)."),
    prompts: str = typer.Option("rtp", help="Prompt set (split 60/20/20 into train / validation / test)."),
    scorer: str = typer.Option("default", help="Toxicity scorer."),
    n_test: int | None = typer.Option(None, min=0, help="Held-out test prompts (0: all); default from --preset."),
    k: int | None = typer.Option(None, min=1, help="Samples per test prompt; default from --preset."),
    n_val: int | None = typer.Option(None, min=1, help="Validation prompts per setting; default from --preset."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="New tokens per continuation; default from --preset."),
    seed: int = typer.Option(0, help="Seed of the split and of the per-row random numbers."),
    test_all_settings: bool = typer.Option(False, help="After the choice on validation, also test every candidate "
                                           "setting (tables/candidates.csv; reported, not used to choose)."),
    batch_size: int | None = typer.Option(None, min=1, help="Rows (prompt x sample) per generate call; default "
                                          "from --preset."),
    timing_reps: int | None = typer.Option(None, min=1, help="Paired timing per arm: one test batch generated with "
                                           "and without the method this many times, alternating; the time column is "
                                           "the median ratio (the baseline's row: an A/A run, the noise); default "
                                           "from --preset (quick 1, others 3)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    device_map: str = typer.Option("", "--device-map", help=DEVICE_MAP_HELP),
) -> None:
    """The detoxification benchmark: every registered method fitted on the training split, its
    settings chosen on validation, evaluated on held-out prompts with the same decoding, random
    numbers and scorer; one table (toxicity with paired CIs, fluency, side effects, cost) and report.html.
    Under `accelerate launch --num_processes N` the processes share every generation (docs/bench.md)."""
    from .experiments.bench import make_config, run_bench
    from .parallel import group

    cfg = make_config(preset, methods=[x.strip() for x in methods.split(",") if x.strip()] or None, prompts=prompts,
                      scorer=scorer, n_test=n_test, k=k, n_val=n_val, max_new_tokens=max_new_tokens, seed=seed,
                      batch_size=batch_size, test_all_settings=test_all_settings, timing_reps=timing_reps)
    cfg.validate()
    m = _load(model, device=device, device_map=device_map)
    metrics = run_bench(m, out, cfg, progress=group().main)
    if not group().main:  # a data-parallel launch: rank 0 reports
        return
    _print_bench(m.name, metrics)
    console.print(f"report: {out}/report.html (wall time of this call {metrics['wall_seconds_this_call']:.0f} s)")


def _print_bench(name: str, metrics: dict) -> None:
    from .experiments.bench_report import table_rows

    cols = {"method": "method", "expected max toxicity [95% CI]": "exp. max toxicity [95% CI]",
            "Δ mean toxicity vs unsteered (paired 95% CI)": "Δ mean toxicity [paired 95% CI]",
            "perplexity": "ppl", "neutral KL": "neutral KL", "distinct-2": "dist-2",
            "generation time x": "time x", "settings": "chosen settings"}
    t = Table(title=f"{name}: detoxification benchmark, {metrics['n_test_prompts']} held-out prompts x "
                    f"{metrics['k']} ({metrics['preset']}); full table in report.html", title_justify="left")
    for c, short in cols.items():
        t.add_column(short, justify="left" if c in ("method", "settings") else "right",
                     no_wrap=c not in ("settings",), overflow="fold")
    for r in table_rows(metrics):
        if r["status"] != "ok":
            t.add_row(r["method"], "failed", *[""] * (len(cols) - 3), escape(r["note"][:90]))
            continue
        t.add_row(*[escape(str(r.get(c, ""))) for c in cols])
    console.print(t)


@command(app)
def demo(model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
         out: str = typer.Option("runs/bench", "--out", "-o", help="Run directory of the benchmark.")) -> None:
    """The main job: the quick detoxification benchmark on the embedded model (`steerlab bench --preset quick`)."""
    bench(out=out, model=model, preset="quick", methods="", prompts="rtp", scorer="default", n_test=None, k=None,
          n_val=None, max_new_tokens=None, seed=0, batch_size=None, device="cpu", device_map="", test_all_settings=False,
          timing_reps=None)


# --- instruction-tuning explanations (docs/instruction_shift.md) ----------------------------------
LABELLER_URL_HELP = ("OpenAI-compatible endpoint (base URL, e.g. http://localhost:8000/v1) that labels each "
                     "component's word list; key from $STEERLAB_LABELLER_KEY if set.")


def make_labeller(url: str, name: str, local: str):
    """The FFN labeller the options ask for (None without one)."""
    import os

    from .explain.ffn import LocalLabeller, OpenAILabeller

    if url and local:
        raise typer.BadParameter("give either --labeller-url or --labeller-local, not both")
    if url:
        return OpenAILabeller(url, name or "default", os.environ.get("STEERLAB_LABELLER_KEY"))
    return LocalLabeller(_load(local)) if local else None


@command(app)
def attribute(
    prompt: str = typer.Argument(..., help="The prompt (a user turn when the model has a chat template)."),
    response: str = typer.Option(None, "--response", "-r", help="Response to explain; default: the greedy reply."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    span: str = typer.Option("", "--span", help="Instruction span (a substring of the prompt) to score."),
    html_out: str = typer.Option("", "--html", help="Write the shaded prompt and the heat map to this HTML file."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    b: int = typer.Option(7, "--b", min=0, max=10, help="Quantised scores <= b are zeroed."),
    chunk: int = typer.Option(16, "--chunk", min=1, help="Output tokens per batched backward (reverse mode) or "
                              "prompt tokens per batched forward-mode product (forward mode)."),
    mode: str = typer.Option("auto", "--mode", help="reverse (one VJP per response token) | forward (one JVP per "
                             "prompt token) | auto (forward when the prompt is under half the response's length)."),
) -> None:
    """Gradient x input attribution of the response on the prompt: importance density per prompt token."""
    from .explain.attribution import attribute as run_attribution

    m = _load(model)
    att = run_attribution(m, prompt, response, max_new_tokens=max_new_tokens, chunk=chunk, mode=mode)
    d = att.density(b)
    console.print(f"response: {att.response!r} ({len(att.response_tokens)} tokens)", soft_wrap=True)
    t = Table(title="most important prompt tokens (importance density)", title_justify="left")
    t.add_column("position", justify="right")
    t.add_column("token")
    t.add_column("density", justify="right")
    pieces = att.prompt_pieces()
    for i in d.argsort()[::-1][:15]:
        t.add_row(str(i), repr(pieces[i]), f"{d[i]:.3f}")
    console.print(t)
    if span:
        console.print(f"instruction score S({span!r}) = {att.instruction_score(span, b):.4f}")
    if html_out:
        write_attribution_page(att, html_out, span or None, b)
        console.print(f"wrote {html_out}")


def write_attribution_page(att, path: str, span: str | None, b: int) -> None:
    from pathlib import Path

    from .explain.attribution_study import heatmap, prompt_html
    from .report.html import HtmlReport

    out = Path(path)
    page = HtmlReport("Input-output attribution", f"response: {att.response}")
    page.heading("Prompt tokens shaded by importance density").raw(prompt_html(att, b, span))
    png = heatmap(att, out.with_suffix(".png"))
    page.figure(png, "Normalised attribution: response token (rows) x prompt token (columns)")
    page.write(out)


@command(app)
def heads(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    layers: str = typer.Option("", help="Comma-separated layers (default all)."),
    words: int = typer.Option(5000, "--words", min=2, help="Vocabulary: the N most frequent English words."),
    similarity: str = typer.Option("embeddings", help="'embeddings' (the model's input embeddings) or 'minilm'."),
    top: int = typer.Option(8, "--top", min=1, help="Pairs shown per head."),
    out: str = typer.Option("", "--out", help="Also write all pairs to this CSV file."),
) -> None:
    """Attention-head word pairs (key=query) from the query-key bilinear form on word embeddings."""
    from .experiments.instruction_shift import head_rows
    from .explain.heads import explain_heads
    from .runs import write_csv

    m = _load(model)
    res = explain_heads(m, _ints(layers) or None, n_words=words, similarity=similarity)
    t = Table(title=f"head word pairs of {m.name} (similarity: {similarity})", title_justify="left")
    for c in ("layer", "head", "pairs (key=query)"):
        t.add_column(c)
    for hp in res:
        for h, pairs in enumerate(hp.pairs):
            t.add_row(str(hp.layer), str(h), ", ".join(f"{k}={q}" for k, q, _, _ in pairs[:top]))
    console.print(t)
    if out:
        write_csv(out, head_rows(res, m.name, top=10**6))


@command(app)
def ffn(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    layers: str = typer.Option("", help="Comma-separated layers (default all)."),
    pcs: int = typer.Option(5, "--pcs", min=1, help="Principal components per layer."),
    top: int = typer.Option(50, "--top", min=1, help="Words per component."),
    labeller_url: str = typer.Option("", "--labeller-url", help=LABELLER_URL_HELP),
    labeller_model: str = typer.Option("", "--labeller-model", help="Model name sent to the endpoint."),
    labeller_local: str = typer.Option("", "--labeller-local", help="A steerlab model that labels the lists."),
) -> None:
    """FFN concepts: principal components of each layer's MLP value vectors, read as vocabulary words."""
    from .explain.ffn import explain_ffn, label_layers

    m = _load(model)
    res = explain_ffn(m, _ints(layers) or None, k=top, n_components=pcs)
    lab = make_labeller(labeller_url, labeller_model, labeller_local)
    if lab is not None:
        label_layers(res, lab, pcs)
    t = Table(title=f"FFN components of {m.name}", title_justify="left")
    for c in ("layer", "pc", "var. ratio", "label", "top words"):
        t.add_column(c)
    for fl in res:
        for r, ws in enumerate(fl.words):
            label = f"{fl.labels[r]['level']}/{fl.labels[r]['task']}" if fl.labels else ""
            t.add_row(str(fl.layer), str(r), f"{fl.evr[r]:.3f}", label, " ".join(ws[:12]))
    console.print(t)


@command(app, "instruction-shift")
def instruction_shift(
    base: str = typer.Option(..., "--base", help="Base (pre-trained) model. " + MODEL_HELP),
    tuned: str = typer.Option(..., "--tuned", help="Instruction-tuned model. " + MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (tables/, figures/, report.html)."),
    data: str = typer.Option("example", "--data", help="Annotated JSONL file, or 'example' (bundled, 20 items)."),
    layers: str = typer.Option("", help="Comma-separated layers (default all; same indices on both models)."),
    words: int = typer.Option(3000, "--words", min=2, help="English words for the head analysis."),
    pcs: int = typer.Option(10, "--pcs", min=1, help="FFN components per layer."),
    generate: bool = typer.Option(False, help="Score each model's own greedy replies instead of the given ones."),
    raw: bool = typer.Option(False, help="Feed the raw prompt to both models (no chat template), for a like-for-"
                             "like attribution; default: the chat template where a model has one."),
    labeller_url: str = typer.Option("", "--labeller-url", help=LABELLER_URL_HELP),
    labeller_model: str = typer.Option("", "--labeller-model", help="Model name sent to the endpoint."),
    labeller_local: str = typer.Option("", "--labeller-local", help="A steerlab model that labels the lists."),
) -> None:
    """Compare a base and an instruction-tuned model: attribution, head word pairs, FFN concepts."""
    from .experiments.instruction_shift import ShiftConfig, run_instruction_shift

    cfg = ShiftConfig(data=data, layers=_ints(layers) or None, n_words=words, n_pcs=pcs, generate=generate, raw=raw,
                      labeller=labeller_url or labeller_local)
    lab = make_labeller(labeller_url, labeller_model, labeller_local)
    summary = run_instruction_shift(_load(base), _load(tuned), out, cfg, lab)
    for name, test in summary["tests"].items():
        if "error" in test:
            console.print(f"{name}: {test['error']}")
        else:
            console.print(f"{name}: mean {test['mean_a']:.3f} ({test['group_a']}) vs {test['mean_b']:.3f} "
                          f"({test['group_b']}), t = {test['t']:.2f}, one-sided p = {test['p_one_sided']:.3g}")
    console.print(f"report: {out}/report.html")

from . import cli_heads, cli_selfie  # noqa: E402, F401  (register `probes`, `fit iti`, `fit slim`, `fit selfie-control`)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
