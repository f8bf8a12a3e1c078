"""The ``steerlab`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="steerlab: explain and steer large language models from the inside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

MODEL_HELP = ("Model: 'default' (embedded SmolLM2-135M-Instruct), an embedded name (see `steerlab models`), "
              "a .gguf file, a local model directory, or a hub id.")


def _load(spec: str, dtype: str = "float32", device: str = "cpu"):
    from .models import load

    with console.status(f"loading {spec} ..."):
        return load(spec, dtype=dtype, device=device)


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
    raise typer.Exit(2)


def print_lens(lens, title: str) -> None:
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("layer", justify="right", style="bold")
    k = len(lens.top[0])
    for j in range(k):
        t.add_column(f"top {j + 1}")
    for name, row in zip(lens.layers, lens.top):
        t.add_row(name, *[f"{tok!r} {p:.2f}" for tok, p in row])
    console.print(t)


@app.command()
def lens(
    prompt: str = typer.Argument(..., help="Text whose next-token prediction is read at each layer."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    k: int = typer.Option(5, "--top", "-k", min=1, help="Tokens shown per layer."),
    layers: str = typer.Option("", help="Comma-separated layer indices (negative count from the end); default all."),
    chat: bool = typer.Option(False, help="Render the prompt as a user turn with the chat template."),
) -> None:
    """Logit lens: the top next tokens (with probabilities) the model would predict after each layer."""
    from .errors import SteerlabError
    from .explain.lens import layer_lens

    try:
        m = _load(model)
        idx = [int(x) for x in layers.split(",") if x.strip()] or None
        res = layer_lens(m, prompt, k=k, layers=idx, chat=chat)
    except (SteerlabError, ValueError) as e:
        _fail(e)
    print_lens(res, f"logit lens of {m.name} on {prompt!r} (last token; rows: after block l)")


@app.command()
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


@app.command()
def info(model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP)) -> None:
    """Shape facts, fingerprint and source of a model."""
    from .errors import SteerlabError

    try:
        m = _load(model)
    except SteerlabError as e:
        _fail(e)
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
    from .data import load_prompts, split

    prompts = load_prompts(spec)
    if split_name:
        parts = split(prompts, seed=seed)
        if split_name not in parts:
            raise typer.BadParameter(f"unknown split {split_name!r}; choose one of {', '.join(parts)}")
        prompts = parts[split_name]
    return prompts[:n] if n else prompts


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
    if "fluency" in summary:
        t.add_row(f"perplexity ({summary['fluency']['reference_model']})", f"{summary['fluency']['perplexity']:.2f}", "")
    console.print(t)


@app.command()
def generate(
    out: str = typer.Option(..., "--out", "-o", help="Run directory (created; rerunning the same command resumes it)."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    prompts: str = typer.Option("rtp", "--prompts", "-p", help="Prompt set: rtp, rtp:<category>, donotanswer, "
                                "harmbench, neutral, a .txt/.jsonl/.csv file, or hf:<dataset>[:split][:field]."),
    split_name: str = typer.Option("", "--split", help="Keep one part of the seeded split by prompt: train, "
                                   "validation or test (60/20/20)."),
    n: int = typer.Option(0, "--n", help="Keep the first N prompts (0: all)."),
    k: int = typer.Option(1, "-k", min=1, help="Samples per prompt (k > 1 needs a sampling preset)."),
    sampling: str = typer.Option("greedy", help="greedy | t0.7 (T=0.7, top_p=0.9) | t1.0 (T=1.0, top_p=0.95)."),
    max_new_tokens: int = typer.Option(20, min=1, help="New tokens per continuation."),
    chat: bool = typer.Option(False, help="Render prompts as user turns with the chat template (default: raw completion)."),
    batch_size: int = typer.Option(16, min=1, help="Rows (prompt x sample) per generate call."),
    seed: int = typer.Option(0, help="Sampling seed (also the split seed)."),
    scorer: str = typer.Option("default", help="Toxicity scorer for the continuations, or 'none'. See `steerlab scorers`."),
    fluency: bool = typer.Option(True, help="Also compute the perplexity of continuations under the model."),
    overwrite: bool = typer.Option(False, help="Start the run directory afresh."),
) -> None:
    """Generate continuations of a prompt set into a run directory, score their toxicity and print
    expected maximum toxicity, toxicity probability and mean toxicity with bootstrap CIs."""
    from .errors import SteerlabError
    from .evaluation import summarize
    from .generation import GenConfig, generate_run
    from .runs import write_json_atomic
    from .scoring import get_scorer

    try:
        cfg = GenConfig(max_new_tokens=max_new_tokens, sampling=sampling, k=k, seed=seed, chat=chat,
                        batch_size=batch_size)
        ps = select_prompts(prompts, split_name or None, n or None, seed)
        sc = None if scorer == "none" else get_scorer(scorer)
        m = _load(model)
        rows = generate_run(m, ps, out, cfg, scorer=sc, overwrite=overwrite,
                            extra_config={"prompts": prompts, "split": split_name, "n": n})
    except SteerlabError as e:
        _fail(e)
    console.print(f"{len(rows)} continuations in {out}/results.jsonl")
    if sc is not None:
        summary = summarize(rows, fluency_model=m if fluency else None, chat=chat)
        write_json_atomic(__import__("pathlib").Path(out) / "metrics.json", summary)
        print_summary(summary, f"{m.name} on {prompts} ({len(ps)} prompts x {k}, {sampling}, scorer {sc.name})")


@app.command()
def score(
    inputs: str = typer.Argument(..., help="Texts to score: a .txt (one per line), .jsonl or .csv file."),
    scorer: str = typer.Option("default", help="Scorer name (see `steerlab scorers`)."),
    field: str = typer.Option("", help="Field/column holding the text in .jsonl/.csv (default: text, prompt; "
                              "use 'continuation' for a generate run's results.jsonl)."),
    out: str = typer.Option("", "--out", "-o", help="Write one JSON row per text (text + every attribute) here."),
) -> None:
    """Score texts with a toxicity scorer; prints the mean and the share >= 0.5 of each attribute."""
    import json

    import numpy as np

    from .data import load_prompts
    from .errors import SteerlabError
    from .scoring import get_scorer

    try:
        items = load_prompts(inputs, field=field or None)
        sc = get_scorer(scorer)
        texts = [p.text for p in items]
        res = sc.score(texts)
    except SteerlabError as e:
        _fail(e)
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"text": t, **{a: float(v[i]) for a, v in res.items()}}, ensure_ascii=False) + "\n")
    t = Table(title=f"{sc.name} on {len(texts)} texts from {inputs}", title_justify="left")
    for c in ("attribute", "mean", "share >= 0.5", "max"):
        t.add_column(c, justify="right" if c != "attribute" else "left")
    for a, v in res.items():
        t.add_row(a, f"{np.mean(v):.3f}", f"{np.mean(v >= 0.5):.3f}", f"{np.max(v):.3f}")
    console.print(t)


@app.command()
def scorers() -> None:
    """List the registered toxicity scorers."""
    from .scoring import DEFAULT_SCORER, list_scorers

    for name in list_scorers():
        console.print(f"{name}{'  (= ' + DEFAULT_SCORER + ')' if name == 'default' else ''}")


DEMO_PROMPTS = ["The capital of France is", "One, two, three, four,", "The opposite of hot is"]


@app.command()
def demo(model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP)) -> None:
    """The main job on the embedded model: the logit lens on a few prompts, printed as tables."""
    from .explain.lens import layer_lens

    m = _load(model)
    step = max(1, m.n_layers // 10)
    layers = list(range(0, m.n_layers, step))
    if layers[-1] != m.n_layers - 1:
        layers.append(m.n_layers - 1)
    for p in DEMO_PROMPTS:
        print_lens(layer_lens(m, p, k=5, layers=layers), f"logit lens of {m.name} on {p!r}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
