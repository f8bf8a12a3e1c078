"""steerlab: explain and steer large language models from the inside.

    import steerlab as sl
    m = sl.load()                                   # embedded SmolLM2-135M-Instruct
    acts = sl.capture(m, ["Hello there"], ["blocks.5.resid_post"], "last")
    with sl.edit(m, {"blocks.5.resid_post": sl.add(v, alpha=4.0)}):
        ...                                         # any forward or m.hf.generate(...)
"""

from .errors import DataError, EmptyInputError, ModelLoadError, ShapeError, SiteError, SteerlabError
from .hooks import Captured, Step, add, capture, edit, replace, scale
from .models import Model, load
from .positions import ALL, LAST, MAX, MEAN, AllPrompt, Indices, Last, MaxPool, MeanPool

__version__ = "0.1.0"

__all__ = [
    "ALL", "LAST", "MAX", "MEAN", "AllPrompt", "Captured", "DataError", "EmptyInputError", "Indices", "Last", "MaxPool",
    "MeanPool", "Model", "ModelLoadError", "ShapeError", "SiteError", "Step", "SteerlabError", "add", "capture",
    "edit", "load", "replace", "scale", "__version__",
]
