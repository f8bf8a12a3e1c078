"""One registry type for every named choice (intervention methods, fit methods, apply modes,
schedules, scorers, self-correction instructions), and the one "unknown X; choose one of ..." error.

A :class:`Registry` is a dict whose missing keys raise the registry's error naming the valid
choices. One that names a ``discover`` module imports it on first use: that module registers the
built-in entries (for interventions, :mod:`steerlab.methods`, the one list of built-in methods,
which sits above the method files so the protocol module never imports its implementations)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import SteerlabError

T = TypeVar("T")


def unknown(what: str, name: Any, choices: Iterable[Any]) -> str:
    """The one message for a name that is not among ``choices``."""
    return f"unknown {what} {name!r}; choose one of {', '.join(map(str, choices))}"


def choose(what: str, name: Any, choices: Iterable[Any], error: type[Exception] = SteerlabError) -> Any:
    """``name`` when it is one of ``choices``, else ``error`` with :func:`unknown`'s message."""
    choices = list(choices)
    if name not in choices:
        raise error(unknown(what, name, choices))
    return name


class Registry(dict):
    """Named entries of one kind: ``reg[name]`` (an unknown name raises ``error`` listing the
    registered ones), ``reg.register(name)(obj)`` or ``reg.register(name, obj)``, ``name in reg``,
    iteration in registration order."""

    def __init__(self, what: str, error: type[Exception] = SteerlabError, discover: str | None = None):
        super().__init__()
        self.what, self.error, self.discover = what, error, discover
        self._discovered = discover is None

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            importlib.import_module(self.discover)

    def __missing__(self, name):
        self._discover()
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        raise self.error(unknown(self.what, name, self))

    def __contains__(self, name) -> bool:
        self._discover()
        return dict.__contains__(self, name)

    def __iter__(self):
        self._discover()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._discover()
        return dict.__len__(self)

    def keys(self):
        self._discover()
        return dict.keys(self)

    def items(self):
        self._discover()
        return dict.items(self)

    def values(self):
        self._discover()
        return dict.values(self)

    def check(self, name: str) -> str:
        """``name`` when registered, else the registry's error."""
        self[name]
        return name

    def register(self, name: str, obj: T | None = None, overwrite: bool = True) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name`` (as a decorator when ``obj`` is left out)."""
        def put(o: T) -> T:
            if not overwrite and dict.__contains__(self, name):
                raise self.error(f"{self.what} {name!r} is already registered")
            dict.__setitem__(self, name, o)
            return o

        return put if obj is None else put(obj)
