"""Prompt protocols: ways of decoding that change what the model is asked, not its weights or
activations (the multi-round self-correction dialogue of arXiv 2505.11924)."""
