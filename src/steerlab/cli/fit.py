"""``steerlab fit METHOD [--OPTION VALUE ...]``: one command for every registered method, its options
read from the method's declared ``FitOptions`` (``steerlab interventions METHOD`` lists them);
``steerlab steer fit`` is ``fit steering``."""

from __future__ import annotations

import typer
from rich.markup import escape

from .app import MODEL, STEER, app, command, console, load_model, steer_app

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def parse_fit_args(cls, args: list[str]) -> dict:
    """``--name value`` / ``--flag`` / ``--no-flag`` / ``--name=value`` pairs read against the method's
    ``FitOptions``: an option it does not declare is an error listing the ones it has."""
    from ..interventions import InterventionError
    from ..options import listing, parse_value, specs

    sp = {s.name: s for s in specs(cls.FitOptions)}
    sp.update({a: s for s in list(sp.values()) for a in s.aliases})
    raw: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--"):
            raise InterventionError(f"unexpected argument {tok!r}: give options as --NAME VALUE")
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in sp and sp[name[3:]].type is bool
        key = name[3:] if negated else name
        if key not in sp:
            raise InterventionError(f"{cls.method} has no fit option --{tok[2:].split('=')[0]}; its options are: "
                                    f"{listing(cls.FitOptions)}")
        if sp[key].type is bool and not eq:
            value = "false" if negated else "true"
        elif not eq:
            if i + 1 >= len(args):
                raise InterventionError(f"--{tok[2:]} needs a value")
            i += 1
            value = args[i]
        raw.setdefault(sp[key].name, []).append(value)
        i += 1
    return {k: parse_value(sp[k], v if sp[k].type is list else v[-1], f"--{k.replace('_', '-')}")
            for k, v in raw.items()}


@command(app, "fit", panel=STEER, context_settings=EXTRA)
def fit(
    ctx: typer.Context,
    method: str = typer.Argument(..., help="Intervention method (`steerlab interventions` lists them and "
                                 "`steerlab interventions METHOD` its options)."),
    out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    model: str = MODEL,
) -> None:
    """Fit an intervention and save it (safetensors + JSON header); apply it with `steerlab generate
    --intervention FILE`. The method's options follow as --OPTION VALUE (see `steerlab interventions METHOD`)."""
    from pathlib import Path

    from ..interventions import InterventionError, get
    from ..options import OptionError

    if Path(out).is_dir():
        raise InterventionError(f"--out {out} is a directory; give a file path such as {out.rstrip('/')}/"
                                f"{method}.safetensors")
    cls = get(method)
    try:
        options = cls.fit_options(parse_fit_args(cls, list(ctx.args)))
    except OptionError as e:
        raise typer.BadParameter(str(e)) from None
    m = load_model(model)
    iv = cls.from_options(m, options)
    iv.save(out)
    for line in iv.fit_summary():
        console.print(escape(line), soft_wrap=True)
    console.print(escape(f"saved {iv.describe()} to {out}"), soft_wrap=True)


@command(steer_app, "fit", context_settings=EXTRA)
def steer_fit(ctx: typer.Context, out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
              model: str = MODEL) -> None:
    """Fit a steering vector (one direction per layer) from contrast texts and save it: `fit steering`."""
    fit(ctx, method="steering", out=out, model=model)
