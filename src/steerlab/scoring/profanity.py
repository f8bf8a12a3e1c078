"""``profanity``: alt-profanity-check's linear SVM on a bag of words (``predict_prob``), one attribute
``profanity``. Fast (about 100k texts/s) but lexical: it misses toxicity phrased without offensive
words (threats, dehumanising statements)."""

from __future__ import annotations

import numpy as np

from .registry import Scorer, ScorerError


class ProfanityScorer(Scorer):
    """alt-profanity-check's ``predict_prob`` as a scorer."""

    name = "profanity"
    attributes = ["profanity"]
    batch_size = 4096

    def __init__(self) -> None:
        try:
            from profanity_check import predict_prob
        except ImportError as e:
            raise ScorerError("scorer 'profanity' needs the package alt-profanity-check: "
                              "pip install alt-profanity-check==1.9.1") from e
        self._predict = predict_prob

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        parts = [self._predict(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        return {"profanity": np.concatenate(parts)}
