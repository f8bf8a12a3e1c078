"""The model's readout, one object: ``model.unembed``.

The final norm, the unembedding matrix ``U`` (``[vocab, d_model]``) and the final logit
soft-capping some models have (Gemma 2: ``logits = cap * tanh(logits / cap)``). Everything that
reads vectors in vocabulary space goes through it: the logit lens (:meth:`Unembed.lens`: norm,
``U``, soft-cap, the model's own output for its last hidden state), the head alone on states that
are already normed (:meth:`Unembed.logits`), and the direct logit effect of adding a vector just
before the unembedding (:meth:`Unembed.direct_effect`: ``U v``, no norm, no soft-cap). EigenShift's
SVD, FFN concepts, shift analysis and the self-correction study read ``U`` as :attr:`Unembed.weight`.

The modules are looked up on each use, so an edit that swaps the unembedding's parameter or unties
it is seen at once (EigenShift swaps nothing: it corrects the unembedding module's output by a hook)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ShapeError
from .adapters import get_module

if TYPE_CHECKING:
    from .model import Model


class Unembed:
    """Final norm + unembedding + soft-cap of one model (see the module docstring)."""

    def __init__(self, model: Model):
        self.model = model

    def __repr__(self) -> str:
        cap = f", softcap={self.softcap:g}" if self.softcap else ""
        return f"Unembed({self.model.name!r}, vocab={self.weight.shape[0]}, d_model={self.weight.shape[1]}{cap})"

    @property
    def module(self) -> nn.Module:
        """The unembedding module (``lm_head``)."""
        return get_module(self.model.hf, self.model.arch.unembed)

    @property
    def norm(self) -> nn.Module:
        """The final norm (applied to the last block's output before the unembedding)."""
        return get_module(self.model.hf, self.model.arch.final_norm)

    @property
    def weight(self) -> torch.Tensor:
        """The unembedding matrix ``U``, ``[vocab, d_model]`` (the live parameter, not a copy)."""
        return self.module.weight

    @property
    def softcap(self) -> float | None:
        """The final logit soft-capping constant (Gemma 2), or None."""
        return getattr(self.model.config, "final_logit_softcapping", None) or None

    def _cast(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.weight.shape[1]:
            raise ShapeError(f"vector of size {h.shape[-1]} cannot be unembedded: {self.model.name} has "
                             f"d_model={self.weight.shape[1]}")
        p = next(self.module.parameters())
        return h.to(device=p.device, dtype=p.dtype)

    def capped(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` through the model's soft-cap (unchanged when it has none)."""
        cap = self.softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self, h: torch.Tensor, softcap: bool = True) -> torch.Tensor:
        """Float logits ``[..., vocab]`` of final-normed states ``h [..., d_model]``: the head (and the
        soft-cap), as the model computes its output. Differentiable (no ``no_grad``)."""
        out = self.module(self._cast(h)).float()
        return self.capped(out) if softcap else out

    def lens(self, h: torch.Tensor) -> torch.Tensor:
        """The logit lens: float logits ``[..., vocab]`` of residual states ``h [..., d_model]`` read
        through the final norm, the unembedding and the soft-cap (nostalgebraist 2020)."""
        with torch.no_grad():
            return self.capped(self.module(self.norm(self._cast(h))).float())

    def direct_effect(self, v: torch.Tensor) -> torch.Tensor:
        """The direct logit effect ``U v`` ``[..., vocab]`` (float) of adding ``v [..., d_model]`` just
        before the unembedding: linear (a bias of the head is left out), no norm, no soft-cap (difference
        and steering vectors)."""
        with torch.no_grad():
            return nn.functional.linear(self._cast(v), self.weight).float()
