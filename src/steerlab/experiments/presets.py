"""Experiment settings from a named preset with fields overridden (shared by the studies)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..errors import SteerlabError
from ..registry import choose


def from_preset(cls: type, presets: dict[str, dict[str, Any]], name: str | None, overrides: dict[str, Any],
                error: type[SteerlabError], **fixed: Any):
    """``cls(**fixed, **presets[name], **overrides)``: an unknown preset or setting is ``error`` naming
    the valid ones; ``None`` overrides are ignored (an option left unset keeps the preset's value)."""
    base: dict[str, Any] = dict(fixed)
    if name is not None:
        choose("preset", name, presets, error)
        base.update(presets[name])
    names = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise error(f"unknown setting(s) {bad}; settings are {', '.join(sorted(names))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**base)
