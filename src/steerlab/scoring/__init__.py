"""Toxicity scorers behind one registry (``get_scorer``), and the token-toxicity lexicon.

    from steerlab.scoring import get_scorer
    s = get_scorer()                       # the offline default (see DEFAULT_SCORER)
    s.toxicity(["You are so dumb and stupid!", "Have a nice day"])   # -> float64 array in [0, 1]
    s.score(texts)                         # -> {attribute: array}, attributes[0] is the main one

Registered: ``jigsaw-bilstm``, ``profanity``, ``jigsaw-profanity-max`` (= ``default``), ``ensemble``,
``hf-classifier`` (any transformers sequence classifier), ``detoxify`` (a Detoxify checkpoint) and
``perspective`` (Google's Perspective API). See docs/scoring.md. Metrics computed from scores
(toxicity with CIs, perplexity, KL, diversity) live in :mod:`steerlab.metrics`.
"""

from . import builtin  # noqa: F401  (registers the built-in scorers)
from .lexicon import token_lexicon
from .registry import (
    DEFAULT_SCORER,
    MAIN_ARGUMENTS,
    EnsembleScorer,
    Scorer,
    ScorerError,
    compare_scorers,
    get_scorer,
    list_scorers,
    parse_option_value,
    register_scorer,
    scorer_from_spec,
    scorer_identity,
    scorer_options,
    scorer_throughput,
)

__all__ = [
    "DEFAULT_SCORER", "EnsembleScorer", "Scorer", "ScorerError", "compare_scorers", "get_scorer", "list_scorers",
    "register_scorer", "scorer_throughput", "token_lexicon", "MAIN_ARGUMENTS", "parse_option_value",
    "scorer_from_spec", "scorer_identity", "scorer_options",
]
