"""Model loading, embedded defaults and architecture adapters."""

from .adapters import ARCHS, Arch, Site
from .loading import DEFAULT, EMBEDDED, cache_dir, load
from .model import Model

__all__ = ["ARCHS", "Arch", "Site", "DEFAULT", "EMBEDDED", "cache_dir", "load", "Model"]
