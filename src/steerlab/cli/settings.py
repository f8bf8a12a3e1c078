"""Command-line options generated from a settings dataclass (``SteeringStudy``, ``SelfCorrectConfig``):
each field declared with :func:`steerlab.options.option` becomes one typer option with the field's
default and help, so a default or a help text lives in one place (the dataclass)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import typer

from ..options import Spec, specs
from .app import names, numbers


def _text(value: Any) -> str:
    """A list default as the comma-separated text the option takes (``0.0`` shows as ``0``)."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)


def _help(spec: Spec, from_preset: bool) -> str:
    """The field's help; its choices appended unless the help names them all."""
    text = spec.help
    if spec.choices and not all(str(c) in text for c in spec.choices):
        text = f"{text.rstrip('.')}: {spec.allowed()}."
    return f"{text.rstrip('.')}; default from --preset." if from_preset else text


def _parameter(spec: Spec, from_preset: bool) -> inspect.Parameter:
    """The typer parameter of one field: a list is one comma-separated text; a field some preset sets
    defaults to None (the preset's value, or the field's default without a preset)."""
    if spec.type in (list, tuple):
        kind, default = str, _text(spec.default)
    else:
        kind, default = spec.type, spec.default
    if from_preset:
        default = None
    annotation = kind | None if default is None else kind
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, help=_help(spec, from_preset)))


def _value(spec: Spec, given: Any) -> Any:
    """A parsed option value (lists: the CLI's one list parser, which refuses NaN and names the option)."""
    if spec.type not in (list, tuple) or given is None:
        return given
    items = numbers(given, spec.item, f"--{spec.name.replace('_', '-')}") if spec.item in (int, float) else names(given)
    return items if spec.type is list else tuple(items)


def settings_options(cls: type, presets: Mapping[str, Mapping[str, Any]] | None = None):
    """Decorator: ``fn(..., settings: dict)`` becomes a command with one option per command-line field
    of ``cls`` (after ``fn``'s own options); ``settings`` receives their parsed values by field name
    (called from Python with ``settings=`` given, the command passes that dict on as it is).
    Fields set by any of ``presets`` default to None (their value then comes from the preset)."""
    preset_fields = {k for p in (presets or {}).values() for k in p}
    fields = [s for s in specs(cls) if s.cli]

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "settings"]
        clash = {p.name for p in own} & {s.name for s in fields}
        if clash:
            raise TypeError(f"{fn.__name__} declares {sorted(clash)} itself and through {cls.__name__}")
        generated = [_parameter(s, s.name in preset_fields) for s in fields]

        @functools.wraps(fn)
        def run(*a, **k):
            if "settings" in k:  # a direct call from Python (e.g. `demo` runs `bench`) gives the dict itself
                return fn(*a, **k)
            settings = {s.name: _value(s, k.pop(s.name)) for s in fields}
            return fn(*a, settings=settings, **k)

        run.__signature__ = sig.replace(parameters=[*own, *generated])
        annotations = {k: v for k, v in fn.__annotations__.items() if k != "settings"}
        run.__annotations__ = {**annotations, **{p.name: p.annotation for p in generated}}
        return run

    return deco
