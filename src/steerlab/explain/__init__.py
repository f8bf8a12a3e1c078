"""Explanations: logit lens, input-output attribution, attention-head word pairs, FFN concepts
(and later SelfIE, probes)."""

from .attribution import Attribution, attribute
from .ffn import FfnLayer, explain_ffn
from .heads import HeadPairs, explain_heads
from .lens import LayerLens, TokenScores, layer_lens, top_tokens, unembed

__all__ = ["Attribution", "FfnLayer", "HeadPairs", "LayerLens", "TokenScores", "attribute", "explain_ffn",
           "explain_heads", "layer_lens", "top_tokens", "unembed"]
