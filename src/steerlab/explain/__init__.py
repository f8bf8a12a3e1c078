"""Explanations: logit lens and (later) attribution, heads, FFN concepts, SelfIE, probes."""

from .lens import LayerLens, TokenScores, layer_lens, top_tokens, unembed

__all__ = ["LayerLens", "TokenScores", "layer_lens", "top_tokens", "unembed"]
