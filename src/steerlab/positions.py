"""Position selectors for reading activations from a left-padded batch.

Every batch steerlab builds is left-padded with an attention mask, so the last prompt token of
every row is column -1. A selector turns a site's activation ``[B, T, *feat]`` (with the mask
``[B, T]``) into what is kept: ``[B, *feat]`` for one position or a pool, ``[B, k, *feat]`` for
explicit indices, or the full ``[B, T, *feat]`` for all prompt tokens (``keeps_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ShapeError
from .registry import choose


def _bmask(mask: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.bool).view(*mask.shape, *([1] * (act.dim() - 2)))


class Position:
    keeps_tokens = False

    def select(self, act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Last(Position):
    """The last prompt token (column -1 with left padding)."""

    def select(self, act, mask):
        return act[:, -1]


@dataclass(frozen=True)
class AllPrompt(Position):
    """Every prompt token; results are left-padded ``[N, T, ...]`` with ``Captured.mask``."""

    keeps_tokens = True

    def select(self, act, mask):
        return act


@dataclass(frozen=True)
class Indices(Position):
    """Explicit token indices of each prompt: ``i >= 0`` counts from the first real token,
    ``i < 0`` from the end (-1 is the last token). Result ``[B, len(indices), ...]``."""

    indices: tuple[int, ...]

    def __init__(self, indices: int | Sequence[int]):
        idx = (indices,) if isinstance(indices, int) else tuple(int(i) for i in indices)
        if not idx:
            raise ShapeError("Indices() needs at least one index")
        object.__setattr__(self, "indices", idx)

    def select(self, act, mask):
        B, T = mask.shape
        lengths = mask.sum(1)
        idx = torch.tensor(self.indices, device=act.device)
        cols = torch.where(idx >= 0, (T - lengths)[:, None] + idx[None, :], T + idx[None, :])
        bad = (idx[None, :] >= lengths[:, None]) | (-idx[None, :] > lengths[:, None])
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            raise ShapeError(f"position indices {self.indices} out of range for a prompt of {int(lengths[row])} tokens")
        rows = torch.arange(B, device=act.device)[:, None]
        return act[rows, cols]


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: each left-padded row's first real (unpadded) token."""
    m = mask.to(torch.bool)
    return (m.cumsum(1) == 1) & m


def after_first(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: each row's real tokens except its first one (a row of one token keeps it).

    Many models write a very large activation at the first position (an attention sink: about
    23,000 in norm against 150-450 elsewhere in SmolLM2's middle layers), so a pool or a statistic
    that includes it is dominated by it."""
    m = mask.to(torch.bool)
    return m & ~(first_real(m) & (m.sum(1, keepdim=True) > 1))


@dataclass(frozen=True)
class MeanPool(Position):
    """Mean over the prompt's real tokens (pads masked); ``skip_first`` leaves out each row's first
    token (see :func:`after_first`)."""

    skip_first: bool = False

    def select(self, act, mask):
        m = _bmask(after_first(mask) if self.skip_first else mask, act).to(act.dtype)
        return (act * m).sum(1) / m.sum(1).clamp_min(1)


@dataclass(frozen=True)
class MaxPool(Position):
    """Element-wise max over the prompt's real tokens (pads masked)."""

    def select(self, act, mask):
        return act.masked_fill(~_bmask(mask, act), float("-inf")).amax(1)


LAST = Last()
ALL = AllPrompt()
MEAN = MeanPool()
MEAN_SKIP_FIRST = MeanPool(skip_first=True)
MAX = MaxPool()

_NAMED = {"last": LAST, "all": ALL, "mean": MEAN, "mean_skip_first": MEAN_SKIP_FIRST, "max": MAX}


def as_position(p: Position | str | int | Sequence[int]) -> Position:
    """Accept a selector, a name ('last', 'all', 'mean', 'mean_skip_first', 'max') or indices."""
    if isinstance(p, Position):
        return p
    if isinstance(p, str):
        choose("position (or give indices)", p, _NAMED, ShapeError)
        return _NAMED[p]
    return Indices(p)
