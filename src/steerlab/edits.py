"""The edit operators: what an edit does to a site's activation at the positions its schedule marks.
``add``, ``scale`` and ``replace`` (``sl.add`` ...) and the edits along a unit direction u that a
steering vector's modes use: ``ablate``, ``clamp`` and ``gated``. Each is a small
:class:`~steerlab.hooks.EditFn`: ``bind`` checks sizes and moves tensors to the model once,
``new(act)`` returns the edited activation (the schedule and first-token rule are the base's)."""

from __future__ import annotations

import torch

from .errors import ShapeError
from .hooks import EditFn, finite_tensor, per_row, strength


class Add(EditFn):
    """``act + alpha * vector``; ``alpha`` a scalar or one strength per batch row."""

    def __init__(self, vector: torch.Tensor, alpha=1.0, where: str = "all", skip_first: bool = False):
        super().__init__(where, skip_first)
        self.vector, self.alpha = torch.as_tensor(vector), alpha

    def bind(self, site, feat_shape, device, dtype):
        v = self.vector
        if tuple(v.shape) != tuple(feat_shape) and not (v.dim() == 1 and v.numel() == torch.Size(feat_shape).numel()):
            raise ShapeError(f"vector of shape {tuple(v.shape)} does not fit site {site!r} of shape {tuple(feat_shape)}")
        self._v = finite_tensor(v.reshape(feat_shape).to(device=device, dtype=dtype), f"the vector added at {site!r}")
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
        self._f = strength(f, device, dtype) if self._per_row else \
            finite_tensor(f.to(device=device, dtype=dtype), f"the scale factor at {site!r}")

    def new(self, act):
        return act * (per_row(self._f, act) if self._per_row else self._f)


class ScaleRows(EditFn):
    """``act * factors[row]``: one factor per feature for each batch row (``factors [B, *feat]``)."""

    def __init__(self, factors: torch.Tensor, where: str = "all"):
        super().__init__(where)
        self.factors = torch.as_tensor(factors)

    def bind(self, site, feat_shape, device, dtype):
        if tuple(self.factors.shape[1:]) != tuple(feat_shape):
            raise ShapeError(f"per-row factors of shape {tuple(self.factors.shape)} do not fit site {site!r} of shape "
                             f"{tuple(feat_shape)} (expected [rows, {', '.join(map(str, feat_shape))}])")
        self._f = finite_tensor(self.factors.to(device=device, dtype=dtype), f"the per-row factors at {site!r}")

    def new(self, act):
        if self._f.shape[0] != act.shape[0]:
            raise ShapeError(f"per-row factors have {self._f.shape[0]} rows but the batch has {act.shape[0]}")
        return act * self._f.view(act.shape[0], *([1] * (act.dim() - self._f.dim())), *self._f.shape[1:])


class OnRows(EditFn):
    """``fn``'s edit on the batch rows ``rows`` marks (bool ``[B]``); every other row is returned exactly
    as it came (several settings in one batch: each row edited by its own setting only)."""

    def __init__(self, fn, rows: torch.Tensor):
        super().__init__()
        self.fn, self.rows = fn, torch.as_tensor(rows, dtype=torch.bool)

    def bind(self, site, feat_shape, device, dtype):
        if isinstance(self.fn, EditFn):
            self.fn.bind(site, feat_shape, device, dtype)
        self._rows = self.rows.to(device)

    def __call__(self, act, step):
        if self._rows.shape[0] != act.shape[0]:
            raise ShapeError(f"the row mask has {self._rows.shape[0]} rows but the batch has {act.shape[0]}")
        new = self.fn(act, step)
        return act if new is None else torch.where(self._rows.view(-1, *([1] * (act.dim() - 1))), new, act)


class Replace(EditFn):
    """Overwrite the activation with ``value`` (a feature vector, or ``[B, *feat]`` per row)."""

    def __init__(self, value: torch.Tensor, where: str = "all"):
        super().__init__(where)
        self.value = torch.as_tensor(value)

    def bind(self, site, feat_shape, device, dtype):
        v = self.value
        if tuple(v.shape[-len(feat_shape):]) != tuple(feat_shape):
            raise ShapeError(f"value of shape {tuple(v.shape)} does not fit site {site!r} of shape {tuple(feat_shape)}")
        self._v = finite_tensor(v.to(device=device, dtype=dtype), f"the replacement value at {site!r}")

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
        self._v = finite_tensor(self.vector.reshape(feat_shape).to(device=device, dtype=dtype),
                                f"the direction at {site!r}")
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
