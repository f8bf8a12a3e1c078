"""steerlab: explain and steer large language models from the inside.

    import steerlab as sl
    m = sl.load()                                   # embedded SmolLM2-135M-Instruct
    acts = sl.capture(m, ["Hello there"], ["blocks.5.resid_post"], "last")
    with sl.edit(m, {"blocks.5.resid_post": sl.add(v, alpha=4.0)}):
        ...                                         # any forward or m.hf.generate(...)
    with sl.record(m, ["final"], "last") as rec:    # read while generating
        ...

The names below are imported on first use, so that ``import steerlab.scoring`` (text scorers)
or ``import steerlab.metrics.stats`` does not load the model and hook machinery.
"""

from __future__ import annotations

import importlib

from .errors import DataError, EmptyInputError, ModelLoadError, ShapeError, SiteError, SteerlabError

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(["Captured", "Recording", "Step", "capture", "edit", "record"], "hooks"),
    **dict.fromkeys(["add", "replace", "scale"], "edits"),
    **dict.fromkeys(["Model", "load"], "models"),
    **dict.fromkeys(["ALL", "LAST", "MAX", "MEAN", "AllPrompt", "Indices", "Last", "MaxPool", "MeanPool"], "positions"),
}
_SUBPACKAGES = ("data", "edits", "evaluation", "experiments", "explain", "generation", "hooks", "interventions", "metrics",
                "models", "positions", "protocols", "report", "runs", "scoring", "steer")

__all__ = [
    "DataError", "EmptyInputError", "ModelLoadError", "ShapeError", "SiteError", "SteerlabError", *sorted(_LAZY),
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'steerlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})
