"""Exceptions raised by steerlab. Every one names the problem and, where there is one, the valid range."""


class SteerlabError(ValueError):
    """Base class of steerlab's errors (a ValueError, so generic handlers still catch it)."""


class ModelLoadError(SteerlabError):
    """A model spec could not be resolved or its files could not be read."""


class SiteError(SteerlabError):
    """A site name, layer index or module that the model does not have."""


class ShapeError(SteerlabError):
    """A tensor (vector, strength, mask) of the wrong size for the model or the batch."""


class EmptyInputError(SteerlabError):
    """An empty list of texts, prompts or examples where at least one is needed."""


class DataError(SteerlabError):
    """A prompt set, data file or saved data object that is unknown, missing, unreadable, empty or
    lacks the expected field; the message names the file (or spec) and the problem."""
