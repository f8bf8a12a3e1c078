"""The bottom of the ``steerlab`` command: the app, the console, the one error handler, the shared
options (model, device, threads, out, seed, batch size) and the small parsers every command group uses."""

from __future__ import annotations

import functools
import inspect
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import SteerlabError

# the help panels, in the order `steerlab --help` shows them (commands are registered in this order)
MAIN, EXPLAIN, STEER, EVALUATE, UTILITIES = "Main job", "Explain", "Steer", "Evaluate", "Utilities"


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"steerlab {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="steerlab: explain and steer large language models from the inside.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"max_content_width": 80},
)
# rich assumes 80 columns when stdout is not a terminal; tables are more readable wider
console = Console() if sys.stdout.isatty() else Console(width=130)

MODEL_HELP = ("Model: 'default' (embedded SmolLM2-135M-Instruct), an embedded name (see `steerlab models`), "
              "a .gguf file, a local model directory, or a hub id.")
DEVICE_HELP = ("Device for the model (cpu, cuda, cuda:1, mps); in a data-parallel launch (accelerate launch) "
               "cuda means each process's own GPU.")
DEVICE_MAP_HELP = ("Spread the model over the available devices with this transformers device_map (e.g. auto, "
                   "needs accelerate), for a model larger than one device; replaces --device.")
THREADS_HELP = ("torch CPU threads (0: torch's choice, one per core). On a machine shared with other jobs, 1 can "
                "be much faster. Accepted before or after the command.")

# the shared options: one declaration each
MODEL = typer.Option("default", "--model", "-m", help=MODEL_HELP)
DEVICE = typer.Option("cpu", help=DEVICE_HELP)
DEVICE_MAP = typer.Option("", "--device-map", help=DEVICE_MAP_HELP)
OUT_FILE = typer.Option(..., "--out", "-o", help="Output .safetensors file.")
SEED = typer.Option(0, help="Seed of the split and of sampling.")
BATCH_SIZE = typer.Option(16, min=1, help="Rows (prompt x sample) per generate call.")
SCORER_OPTION = typer.Option([], "--scorer-option", help="KEY=VALUE passed to the scorer (repeatable), e.g. "
                             "model=PATH for hf-classifier; or --scorer NAME:VALUE.")


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.callback()
def _global(
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the steerlab version and exit."),
) -> None:
    set_threads(threads)


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", device_map: str = ""):
    """The one model loader of the CLI (with a status line; the process's own device in a launch)."""
    from ..models import load
    from ..parallel import group

    with console.status(f"loading {spec} ..."):
        return load(spec, dtype=dtype, device=group().device(device), device_map=device_map or None)


def fail(e: Exception) -> None:
    from ..validate import redact

    # the last line of defence: URLs with user info or key-like parts, KEY=VALUE with a secret name
    console.print(f"[bold red]error:[/] {escape(redact(str(e)))}", soft_wrap=True)
    raise typer.Exit(2)


def _with_threads(fn):
    """``fn`` with a ``--threads`` option of its own (so it may follow the subcommand) and the one
    error handler: steerlab errors end in one line and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def run(*a, threads: int = 0, **k):
        set_threads(threads)
        try:
            check_arguments(k)
            return fn(*a, **k)
        except SteerlabError as e:
            fail(e)
        except OSError as e:  # a full disk, a read-only or missing directory: one line, never a traceback
            fail(SteerlabError(f"{e.strerror or type(e).__name__}: {e.filename or e}" if e.filename
                               else f"{type(e).__name__}: {e}"))

    sig = inspect.signature(fn)
    extra = inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                              default=typer.Option(0, "--threads", min=0, help=THREADS_HELP))
    run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    run.__annotations__ = {**fn.__annotations__, "threads": int}
    return run


def short_help(doc: str | None) -> str | None:
    """The command list's line: the docstring's first sentence, or what precedes its colon when long."""
    if not doc:
        return None
    first = " ".join(doc.split()).split(". ")[0].rstrip(".")
    head = first.split(": ")[0]
    return head if len(first) > 120 and len(head) > 20 else first


def command(group: typer.Typer, *args, panel: str | None = None, **kwargs):
    """Register a command on ``group`` (in help panel ``panel``) with the one CLI error handler."""
    def deco(fn):
        kwargs.setdefault("short_help", short_help(fn.__doc__))
        group.command(*args, rich_help_panel=panel, **kwargs)(_with_threads(fn))
        return fn

    return deco


def numbers(text: str, kind: type, option: str) -> list:
    """A comma-separated list of ``kind`` (the one list parser of the CLI)."""
    import math

    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s",
                                 param_hint=option) from None
    bad = [x for x in out if isinstance(x, float) and not math.isfinite(x)]
    if bad:  # NaN or inf as a strength would generate empty text that scores as non-toxic
        raise typer.BadParameter(f"{text!r} holds {bad[0]}; every number must be finite", param_hint=option)
    return out


def ints(text: str, option: str = "--layers") -> list[int]:
    return numbers(text, int, option)


def floats(text: str, option: str = "--alphas") -> list[float]:
    return numbers(text, float, option)


def names(text: str) -> list[str]:
    """A comma-separated list of names, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


def key_values(items: list[str], option: str) -> dict:
    from ..scoring import parse_option_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key.strip().replace("-", "_")] = parse_option_value(value)
    return out


def check_out_file(out: str, option: str = "--out") -> None:
    """An output file path must be usable before any work: not empty, not a directory, under a
    writable directory (:func:`steerlab.validate.output_file`)."""
    from ..validate import ValidationError, output_file

    try:
        output_file(out, "the output file")
    except ValidationError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def check_out_dir(out: str, option: str = "--out") -> None:
    """An output directory must be usable before any work (:func:`steerlab.validate.output_dir`)."""
    from ..validate import ValidationError, output_dir

    try:
        output_dir(out, "the output directory")
    except ValidationError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def check_arguments(values: dict) -> None:
    """Every text argument of a command must be valid UTF-8 (Python keeps undecodable bytes as lone
    surrogates, which fail later and deep inside): one line naming the option instead."""
    from ..validate import check_text

    for name, value in values.items():
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, str):
                check_text(v, f"the value of {name} ({v.encode('utf-8', 'replace').decode()!r})")


# the command groups (their commands are registered by the modules of this package)
steer_app = typer.Typer(help="Steering vectors: fit, sweep layers x strengths, export to llama.cpp.",
                        no_args_is_help=True)
app.add_typer(steer_app, name="steer", rich_help_panel=STEER)
