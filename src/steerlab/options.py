"""Typed method options, declared once.

Every intervention declares ``FitOptions`` and ``ApplyOptions`` as dataclasses whose fields are
made with :func:`option` (type, default, allowed range or choices, one line of meaning, unit).
Everything else reads them: :func:`validate` (Python ``apply(model, **options)``, ``steerlab
generate --apply-option``, ``steerlab fit METHOD --OPTION VALUE``), :func:`parse_value` (command-line
text to the declared type) and :func:`describe` (``steerlab interventions METHOD``). Study settings
(``SteeringStudy``, ``SelfCorrectConfig``) are declared the same way; their command-line options are
generated from the declaration (:mod:`steerlab.cli.settings`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SteerlabError
from .registry import unknown


class OptionError(SteerlabError):
    """An option a method does not have, or a value of the wrong type or out of range."""


@dataclass(frozen=True)
class Spec:
    """One declared option."""

    name: str
    type: type
    default: Any
    help: str
    unit: str = ""
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    aliases: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (meaning: see help)
    item: type = str        # element type of a list option
    repeated: bool = False  # a list option given once per value (--x A --x B), not comma-separated
    cli: bool = True        # offered on the command line (a study setting may be Python-only)

    def allowed(self) -> str:
        if self.choices:
            return " | ".join(map(str, self.choices))
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            return f"[{lo}, {hi}]"
        return ""


def option(default: Any, help: str, *, type: type | None = None, unit: str = "", choices: Sequence | None = None,
           low: float | None = None, high: float | None = None, aliases: Sequence[str] = (), item: type = str,
           repeated: bool = False, cli: bool = True) -> Any:
    """A dataclass field declaring one option (``type`` defaults to the default's type; ``cli=False``:
    a setting the command line does not offer)."""
    t = type if type is not None else builtins_type(default)
    meta = {"type": t, "help": help, "unit": unit, "choices": tuple(choices) if choices else None, "low": low,
            "high": high, "aliases": tuple(aliases), "optional": default is None,
            "item": item, "repeated": repeated, "cli": cli}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def builtins_type(default: Any) -> type:
    if default is None:
        raise OptionError("an option whose default is None needs type=")
    return type(default)


@dataclass
class NoOptions:
    """A method without options."""


def specs(cls: type) -> list[Spec]:
    """The declared options of an options dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(Spec(f.name, m["type"] if "type" in m else builtins_type(default), default, m.get("help", ""), m.get("unit", ""),
                        m.get("choices"), m.get("low"), m.get("high"), m.get("aliases", ()), m.get("optional", False),
                        m.get("item", str), m.get("repeated", False), m.get("cli", True)))
    return out


def listing(cls: type) -> str:
    """``name (meaning, unit)`` of every option, for error messages."""
    parts = [f"{s.name} ({s.help.rstrip('.')}" + (f"; {s.unit}" if s.unit else "") + ")" for s in specs(cls)]
    return "; ".join(parts) if parts else "none"


def parse_value(spec: Spec, text: Any, hint: str = "") -> Any:
    """Command-line text (or a list of texts, for a repeated option) to ``spec``'s type."""
    if not isinstance(text, str | list):
        return text
    try:
        if spec.type is list:
            items = text if isinstance(text, list) else [text]
            if spec.repeated:  # one value per use of the option
                return [spec.item(t) for t in items]
            return [spec.item(x.strip()) for t in items for x in t.split(",") if x.strip()]
        if isinstance(text, list):
            text = text[-1]
        if spec.optional and text.lower() in ("none", ""):
            return None
        if spec.type is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return spec.type(text)
    except ValueError:
        what = f"comma-separated list of {spec.item.__name__}s" if spec.type is list else spec.type.__name__
        article = "an" if what[:1] in "aeiou" else "a"
        raise OptionError(f"{hint or spec.name}: {text!r} is not {article} {what}") from None


def check_value(spec: Spec, value: Any, owner: str) -> Any:
    """``value`` when it has ``spec``'s type, choices and range (a number for a float option may also
    be a tensor of per-row strengths); else :class:`OptionError` naming the option."""
    if value is None:
        if spec.optional:
            return None
        raise OptionError(f"{owner} option {spec.name} cannot be None")
    if isinstance(value, str) and spec.type is not str:
        value = parse_value(spec, value)
    if spec.type is float and not _finite(value):  # NaN passes every range check: refuse it here
        raise OptionError(f"{owner} option {spec.name} must be a finite number"
                          f"{' in ' + spec.allowed() if spec.allowed() else ''}, got {value!r}")
    if spec.type is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value) if isinstance(value, int) else value
    elif spec.type is float and type(value).__name__ == "Tensor":
        return value
    elif spec.type is int and isinstance(value, bool) or not isinstance(value, spec.type):
        if not (spec.type is list and isinstance(value, tuple)):
            raise OptionError(f"{owner} option {spec.name} is a {spec.type.__name__}, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise OptionError(f"{unknown(spec.name, value, spec.choices)} (an option of {owner})")
    if spec.low is not None and value < spec.low or spec.high is not None and value > spec.high:
        raise OptionError(f"{owner} option {spec.name} must be in {spec.allowed()}, got {value!r}")
    return value


def _finite(value: Any) -> bool:
    """Whether a float (or every entry of a tensor of per-row strengths) is finite."""
    if type(value).__name__ == "Tensor":
        import torch

        return bool(torch.isfinite(value).all())
    return not isinstance(value, float) or math.isfinite(value)


def validate(cls: type, given: Mapping[str, Any], owner: str, error: type[Exception] = OptionError) -> Any:
    """An instance of the options dataclass ``cls`` from ``given`` (aliases mapped to their option):
    a name ``cls`` does not declare is ``error`` listing the ones it has, with meaning and unit."""
    sp = {s.name: s for s in specs(cls)}
    alias = {a: s.name for s in sp.values() for a in s.aliases}
    values: dict[str, Any] = {}
    for key, v in given.items():
        name = alias.get(key, key)
        if name not in sp:
            raise error(f"{owner} has no option {key!r}; its options are: {listing(cls)}")
        if name in values:
            raise error(f"{owner}: {key!r} and {name!r} are the same option; give one")
        try:
            values[name] = check_value(sp[name], v, owner)
        except OptionError as e:
            raise error(str(e)) from None
    return cls(**values)


def as_dict(options: Any) -> dict[str, Any]:
    """The fields of an options instance (shallow)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


def describe(cls: type) -> list[tuple[str, str, str, str, str, str]]:
    """(name, type, default, allowed, unit, meaning) rows for a listing."""
    rows = []
    for s in specs(cls):
        name = s.name.replace("_", "-") + (f" (alias {', '.join(s.aliases)})" if s.aliases else "")
        rows.append((name, s.type.__name__, repr(s.default), s.allowed(), s.unit, s.help))
    return rows
