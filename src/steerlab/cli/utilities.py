"""Utility commands: ``models``, ``info``."""

from __future__ import annotations

from .app import MODEL, UTILITIES, app, command, load_model
from .tables import print_info, print_models


@command(app, panel=UTILITIES)
def models() -> None:
    """List the embedded models and supported architectures."""
    from ..models import ARCHS, EMBEDDED

    print_models(EMBEDDED, ARCHS)


@command(app, panel=UTILITIES)
def info(model: str = MODEL) -> None:
    """Shape facts, fingerprint and source of a model."""
    print_info(load_model(model))
