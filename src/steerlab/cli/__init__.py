"""The ``steerlab`` command (typer): :mod:`.app` holds the app, the console, the one error handler and
the shared options; each other module registers one command group on it, imported in the order
`--help` shows them (main job, explain, steer, evaluate, utilities); :mod:`.tables` renders every table."""

from __future__ import annotations

# isort: off
from . import bench  # noqa: F401  (demo, bench: the main job)
from . import explain, selfcorrect, heads, selfie  # noqa: F401
from . import steer, fit  # noqa: F401
from . import evaluate, utilities  # noqa: F401
# isort: on
from .app import app, command, console

__all__ = ["app", "command", "console", "main"]


def main() -> None:
    app()
