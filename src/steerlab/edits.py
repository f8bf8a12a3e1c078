"""The edit operators: what an edit does to a site's activation at the positions its schedule marks.
``add``, ``scale`` and ``replace`` (``sl.add`` ...) and the edits along a unit direction u that a
steering vector's modes use: ``ablate``, ``clamp`` and ``gated``. Each is a small
:class:`~steerlab.hooks.EditFn`: ``bind`` checks sizes and moves tensors to the model once,
``new(act)`` returns the edited activation (the schedule and first-token rule are the base's)."""

from __future__ import annotations

import torch

from .errors import ShapeError
from .hooks import EditFn, per_row, strength


class Add(EditFn):
    """``act + alpha * vector``; ``alpha`` a scalar or one strength per batch row."""

    def __init__(self, vector: torch.Tensor, alpha=1.0, where: str = "all", skip_first: bool = False):
        super().__init__(where, skip_first)
        self.vector, self.alpha = torch.as_tensor(vector), alpha

    def bind(self, site, feat_shape, device, dtype):
        v = self.vector
        if tuple(v.shape) != tuple(feat_shape) and not (v.dim() == 1 and v.numel() == torch.Size(feat_shape).numel()):
            raise ShapeError(f"vector of shape {tuple(v.shape)} does not fit site {site!r} of shape {tuple(feat_shape)}")
        self._v = v.reshape(feat_shape).to(device=device, dtype=dtype)
        self._a = strength(self.alpha, device, dtype)
        if isinstance(self._a, float):
            self._av = self._a * self._v

    def new(self, act):
        if isinstance(self._a, float):
            return act + self._av
        return act + per_row(self._a, act) * self._v


class Scale(EditFn):
    """``act * factor``; factor a scalar, a per-feature tensor, or per-row ``[B]``."""

    def __init__(self, factor, where: str = "all"):
        super().__init__(where)
        self.factor = factor

    def bind(self, site, feat_shape, device, dtype):
        f = self.factor
        self._per_row = not (isinstance(f, torch.Tensor) and tuple(f.shape) == tuple(feat_shape))
        self._f = strength(f, device, dtype) if self._per_row else f.to(device=device, dtype=dtype)

    def new(self, act):
        return act * (per_row(self._f, act) if self._per_row else self._f)


class Replace(EditFn):
    """Overwrite the activation with ``value`` (a feature vector, or ``[B, *feat]`` per row)."""

    def __init__(self, value: torch.Tensor, where: str = "all"):
        super().__init__(where)
        self.value = torch.as_tensor(value)

    def bind(self, site, feat_shape, device, dtype):
        v = self.value
        if tuple(v.shape[-len(feat_shape):]) != tuple(feat_shape):
            raise ShapeError(f"value of shape {tuple(v.shape)} does not fit site {site!r} of shape {tuple(feat_shape)}")
        self._v = v.to(device=device, dtype=dtype)

    def new(self, act):
        v = self._v
        if v.dim() == act.dim() - 1:  # one value per row: [B, *feat]
            v = v.unsqueeze(1)
        return v.expand_as(act).contiguous()


class Projected(EditFn):
    """Base of the edits along the unit direction u of ``vector``; each row's first token is left alone
    (its attention-sink state is what the model expects there)."""

    def __init__(self, vector: torch.Tensor, alpha=1.0, where: str = "all"):
        super().__init__(where, skip_first=True)
        self.vector, self.alpha = torch.as_tensor(vector), alpha

    def bind(self, site, feat_shape, device, dtype):
        if self.vector.numel() != torch.Size(feat_shape).numel():
            raise ShapeError(f"vector of shape {tuple(self.vector.shape)} does not fit site {site!r} of shape "
                             f"{tuple(feat_shape)}")
        self._v = self.vector.reshape(feat_shape).to(device=device, dtype=dtype)
        self._u = self._v / self._v.norm().clamp_min(1e-12)
        self._a = strength(self.alpha, device, dtype)

    def projection(self, act):
        return (act * self._u).sum(-1, keepdim=True)


class Ablate(Projected):
    """``act - alpha (act.u) u``: ``alpha`` times the component along u removed."""

    def new(self, act):
        return act - per_row(self._a, act) * self.projection(act) * self._u


class Clamp(Projected):
    """``act + relu(c - act.u) u`` with ``c = low + alpha (level - low)``: the projection raised to at
    least ``c``, never lowered."""

    def __init__(self, vector, alpha=1.0, where: str = "all", level: float = 0.0, low: float | None = None):
        super().__init__(vector, alpha, where)
        self.level = float(level)
        self.low = self.level if low is None else float(low)

    def new(self, act):
        a = per_row(self._a, act)
        return act + (self.low + a * (self.level - self.low) - self.projection(act)).clamp_min(0) * self._u


class Gated(Projected):
    """``act + alpha v`` at the positions whose projection on u is below ``level``."""

    def __init__(self, vector, alpha=1.0, where: str = "all", level: float = 0.0):
        super().__init__(vector, alpha, where)
        self.level = float(level)

    def new(self, act):
        return act + (self.projection(act) < self.level).to(act.dtype) * per_row(self._a, act) * self._v


def add(vector, alpha=1.0, where: str = "all") -> Add:
    return Add(vector, alpha, where)


def scale(factor, where: str = "all") -> Scale:
    return Scale(factor, where)


def replace(value, where: str = "all") -> Replace:
    return Replace(value, where)
