"""The thin SVD of an unembedding with a fixed sign convention (EigenShift and its report)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVD:
    """Thin SVD ``U = A diag(s) Vt``: ``A [vocab, d]``, ``s [d]`` (descending), ``Vt [d, d]``."""

    A: torch.Tensor
    s: torch.Tensor
    Vt: torch.Tensor


def svd(U: torch.Tensor) -> SVD:
    """Thin SVD of ``U`` in float32 (float64 stays float64), on ``U``'s device, with a fixed sign
    convention: the largest-magnitude entry of each row of ``Vt`` is positive (the sign of a
    singular pair is otherwise arbitrary, and so would be the sign of ``delta``)."""
    x = U.detach()
    A, s, Vt = torch.linalg.svd(x if x.dtype == torch.float64 else x.float(), full_matrices=False)
    sign = torch.sign(Vt.gather(1, Vt.abs().argmax(1, keepdim=True))).squeeze(1)
    return SVD(A * sign, s, Vt * sign[:, None])
