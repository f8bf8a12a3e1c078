"""Toxicity scorers behind one registry (``get_scorer``), and the token-toxicity lexicon.

    from steerlab.scoring import get_scorer
    s = get_scorer()                       # the offline default (see DEFAULT_SCORER)
    s.toxicity(["You are so dumb and stupid!", "Have a nice day"])   # -> float64 array in [0, 1]
    s.score(texts)                         # -> {attribute: array}, attributes[0] is the main one

Registered: ``jigsaw-bilstm``, ``profanity``, ``jigsaw-profanity-max`` (= ``default``), ``ensemble``,
``hf-classifier`` (any transformers sequence classifier), ``detoxify`` (a Detoxify checkpoint) and
``perspective`` (Google's Perspective API). See docs/scoring.md.
"""

from .lexicon import token_lexicon
from .metrics import (
    Estimate,
    KLResult,
    NextTokenLogprobs,
    Perplexity,
    Similarity,
    ToxicityMetrics,
    bootstrap_mean,
    distinct,
    distinct_n,
    expected_max_toxicity,
    kl_divergence,
    kl_from_reference,
    mean_toxicity,
    next_token_logprobs,
    perplexity,
    semantic_similarity,
    sentence_encoder,
    token_nlls,
    topk_kl,
    toxicity_metrics,
    toxicity_probability,
)
from .registry import (
    DEFAULT_SCORER,
    EnsembleScorer,
    Scorer,
    ScorerError,
    compare_scorers,
    get_scorer,
    list_scorers,
    register_scorer,
    scorer_throughput,
)

__all__ = [
    "DEFAULT_SCORER", "EnsembleScorer", "Scorer", "ScorerError", "compare_scorers", "get_scorer", "list_scorers",
    "register_scorer", "scorer_throughput", "token_lexicon",
    # metrics
    "Estimate", "KLResult", "NextTokenLogprobs", "Perplexity", "Similarity", "ToxicityMetrics", "bootstrap_mean",
    "distinct", "distinct_n", "expected_max_toxicity", "kl_divergence", "kl_from_reference", "mean_toxicity",
    "next_token_logprobs", "perplexity", "semantic_similarity", "sentence_encoder", "token_nlls", "topk_kl",
    "toxicity_metrics", "toxicity_probability",
]
