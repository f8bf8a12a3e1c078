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
    console.print(f"[bold red]error:[/] {e}")
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
