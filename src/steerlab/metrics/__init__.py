"""Evaluation metrics shared by every method (METHODS.md, "Shared evaluation conventions").

- :mod:`.stats`: estimates with bootstrap CIs; the RealToxicityPrompts toxicity metrics.
- :mod:`.text`: distinct-n diversity, semantic similarity (bundled sentence model).
- :mod:`.lm`: perplexity (fluency), next-token log-probabilities and KL from a reference
  (side effects on neutral text). These run the model.

Importing this package imports the model machinery (for :mod:`.lm`); the text scorers in
:mod:`steerlab.scoring` do not.
"""

from .lm import (
    KLResult,
    NextTokenLogprobs,
    Perplexity,
    kl_divergence,
    kl_from_reference,
    next_token_logprobs,
    perplexity,
    token_nlls,
    topk_kl,
)
from .stats import (
    Estimate,
    PairedDifference,
    ToxicityMetrics,
    bootstrap_mean,
    expected_max_toxicity,
    mean_toxicity,
    paired_difference,
    toxicity_metrics,
    toxicity_probability,
)
from .text import Similarity, distinct, distinct_n, semantic_similarity, sentence_encoder

__all__ = [
    "Estimate", "PairedDifference", "paired_difference", "KLResult", "NextTokenLogprobs", "Perplexity", "Similarity", "ToxicityMetrics", "bootstrap_mean",
    "distinct", "distinct_n", "expected_max_toxicity", "kl_divergence", "kl_from_reference", "mean_toxicity",
    "next_token_logprobs", "perplexity", "semantic_similarity", "sentence_encoder", "token_nlls", "topk_kl",
    "toxicity_metrics", "toxicity_probability",
]
