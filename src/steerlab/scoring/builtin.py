"""The built-in scorers, registered when :mod:`steerlab.scoring` is imported (each implementation
module is imported when its scorer is first asked for)."""

from __future__ import annotations

from collections.abc import Sequence

from .registry import BUILTIN_FACTORIES, DEFAULT_SCORER, EnsembleScorer, Scorer, ScorerError, register_scorer


def _jigsaw(**kw) -> Scorer:
    from .jigsaw import JigsawBiLSTM

    return JigsawBiLSTM(**kw)


def _profanity(**kw) -> Scorer:
    from .profanity import ProfanityScorer

    return ProfanityScorer(**kw)


def _hf(**kw) -> Scorer:
    from .hf import HFClassifierScorer

    return HFClassifierScorer(**kw)


def _detoxify(**kw) -> Scorer:
    from .hf import DetoxifyScorer

    return DetoxifyScorer(**kw)


def _perspective(**kw) -> Scorer:
    from .perspective import PerspectiveScorer

    return PerspectiveScorer(**kw)


def _ensemble(members: Sequence[str | Scorer] = ("jigsaw-bilstm", "profanity"), reduce: str = "max",
              name: str | None = None) -> Scorer:
    return EnsembleScorer(members, reduce=reduce, name=name)


def _default(**kw) -> Scorer:
    if kw:
        raise ScorerError(f"scorer {DEFAULT_SCORER!r} takes no options, got {sorted(kw)}")
    return EnsembleScorer(["jigsaw-bilstm", "profanity"], reduce="max", name=DEFAULT_SCORER)


for _name, _factory in [("jigsaw-bilstm", _jigsaw), ("profanity", _profanity), ("hf-classifier", _hf),
                        ("detoxify", _detoxify), ("perspective", _perspective), ("ensemble", _ensemble),
                        (DEFAULT_SCORER, _default)]:
    register_scorer(_name, _factory)
    BUILTIN_FACTORIES[_name] = _factory
