"""The logit lens: read a residual-stream vector (or any d_model vector) in vocabulary space.

``logits = U · norm(h)`` (nostalgebraist 2020): the model's own final norm and unembedding
applied to an intermediate state. Without the norm, ``U · v`` is the direct logit effect of
adding ``v`` just before the unembedding (used for difference and steering vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ShapeError
from ..hooks import capture
from ..models.model import Model


def unembed(model: Model, h: torch.Tensor, through_norm: bool = True) -> torch.Tensor:
    """Logits ``[..., vocab]`` of states ``h [..., d_model]``: the logit lens (final norm, unembedding,
    soft-cap: ``model.unembed.lens``) by default, else the direct logit effect ``U h``
    (``model.unembed.direct_effect``)."""
    return model.unembed.lens(h) if through_norm else model.unembed.direct_effect(h)


def token_str(model: Model, i: int) -> str:
    return model.tok.convert_tokens_to_string([model.tok.convert_ids_to_tokens(int(i))])


@dataclass
class TokenScores:
    """Top promoted and suppressed tokens of one vector, with their scores."""

    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


def top_tokens(model: Model, vec: torch.Tensor, k: int = 10, through_norm: bool = False) -> TokenScores:
    """The ``k`` tokens a vector promotes most (highest logit) and suppresses most (lowest)."""
    if vec.dim() != 1:
        raise ShapeError(f"top_tokens expects one vector [d_model], got shape {tuple(vec.shape)}")
    logits = unembed(model, vec, through_norm)
    hi, lo = logits.topk(k), (-logits).topk(k)
    return TokenScores(
        [(token_str(model, i), float(v)) for v, i in zip(hi.values, hi.indices)],
        [(token_str(model, i), float(-v)) for v, i in zip(lo.values, lo.indices)],
    )


@dataclass
class LayerLens:
    """Per-layer predictions at one position: ``probs[l]`` are the top-k (token, probability)
    of ``softmax(U norm(h_l))``; ``layers`` names the rows; the last row is the model's output."""

    prompt: str
    layers: list[str]
    top: list[list[tuple[str, float]]]


def layer_lens(model: Model, prompt: str, k: int = 5, layers: Sequence[int] | None = None,
               chat: bool = False) -> LayerLens:
    """What the model would predict next after each block (logit lens at the last prompt token)."""
    if not 1 <= k <= model.vocab_size:
        raise ShapeError(f"k must be between 1 and the vocabulary size {model.vocab_size}, got {k}")
    idx = list(range(model.n_layers)) if layers is None else [model.site(f"blocks.{i}.resid_post").layer for i in layers]
    sites = [f"blocks.{i}.resid_post" for i in idx]
    caps = capture(model, [prompt], sites, "last", chat=chat)
    h = torch.stack([caps[s][0] for s in sites])  # [L, d]
    probs = unembed(model, h).softmax(-1)
    top = probs.topk(k, dim=-1)
    rows = [[(token_str(model, i), float(p)) for p, i in zip(pv, iv)] for pv, iv in zip(top.values, top.indices)]
    return LayerLens(prompt, [str(i) for i in idx], rows)
