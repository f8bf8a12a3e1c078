"""The scorer protocol and registry: ``get_scorer(name)`` gives a :class:`Scorer` whose ``score(texts)``
returns per-text probabilities in [0, 1] for each of its attributes.

Scorers are built lazily by factories (a scorer's heavy imports happen when it is first asked for), and
scorers asked for by name alone are cached, so ``get_scorer("default")`` loads its weights once per
process.
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import SteerlabError
from ..registry import unknown
from ..validate import MASK, is_secret_name, public_options, redact

__all__ = [
    "DEFAULT_SCORER", "EnsembleScorer", "Scorer", "ScorerError", "compare_scorers", "get_scorer", "list_scorers",
    "register_scorer", "scorer_identity", "scorer_throughput", "MAIN_ARGUMENTS", "parse_option_value", "scorer_from_spec",
    "scorer_options",
]

DEFAULT_SCORER = "jigsaw-profanity-max"
"""The offline default: per text, the larger of the Jigsaw BiLSTM's ``toxic`` probability and
alt-profanity-check's probability (the evidence for this choice is in docs/scoring.md)."""


class ScorerError(SteerlabError):
    """A scorer that cannot be built or cannot score: unknown name, missing asset, bad input, bad reply."""


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """Validate a batch of texts: a list (or tuple, or other sequence) of ``str``; a bare string is one text."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes | bytearray) or not isinstance(texts, Sequence):
        raise ScorerError(f"texts must be a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ScorerError(f"texts must be strings: item {i} is {type(t).__name__} ({t!r:.60})")
    return out


class Scorer:
    """A text classifier that gives each text a probability per attribute.

    Subclasses set ``name`` (the registry name), ``attributes`` (the first one is the main toxicity
    attribute) and ``batch_size``, and implement :meth:`_score` on a non-empty list of strings.
    ``key`` identifies the scorer *and its configuration* (which classifier, which label), for caches.
    """

    name: str = "scorer"
    attributes: list[str] = []
    batch_size: int = 64
    options: dict = {}  # the options it was built with, secrets left out (part of a run's identity)

    @property
    def key(self) -> str:
        """A string that identifies this scorer's outputs (name plus configuration), used as a cache key."""
        return self.name

    def score(self, texts: str | Sequence[str], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Score ``texts``: ``{attribute: float64 array of shape [len(texts)]}`` with values in [0, 1].

        An empty list gives empty arrays (scoring nothing is not an error); a non-string item is a
        :class:`ScorerError`. ``batch_size`` defaults to the scorer's own.
        """
        texts = as_texts(texts)
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ScorerError(f"batch_size must be a positive integer, got {bs!r}")
        if not texts:
            return {a: np.zeros(0, dtype=np.float64) for a in self.attributes}
        raw = self._score(texts, bs)
        out = {}
        for a in self.attributes:
            v = np.asarray(raw[a], dtype=np.float64).reshape(-1)
            if v.shape[0] != len(texts):
                raise ScorerError(f"scorer {self.name!r} returned {v.shape[0]} scores for {len(texts)} texts "
                                  f"(attribute {a!r})")
            if not np.all(np.isfinite(v)) or v.min() < 0.0 or v.max() > 1.0:
                raise ScorerError(f"scorer {self.name!r} returned values outside [0, 1] for attribute {a!r}")
            out[a] = v
        return out

    def toxicity(self, texts: str | Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """The main attribute's probabilities (``attributes[0]``), shape ``[len(texts)]``."""
        return self.score(texts, batch_size)[self.attributes[0]]

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key!r} attributes={self.attributes}>"


class EnsembleScorer(Scorer):
    """Combines the main attribute of several scorers per text, by ``max`` (flag a text when any
    member does) or ``mean``. Attributes: ``toxicity`` (the combination), then each member's main
    attribute under the member's name."""

    batch_size = 256

    def __init__(self, members: Sequence[str | Scorer], reduce: str = "max", name: str | None = None) -> None:
        if reduce not in ("max", "mean"):
            raise ScorerError(f"ensemble reduce must be 'max' or 'mean', got {reduce!r}")
        if not members:
            raise ScorerError("an ensemble needs at least one member scorer")
        self.members = [get_scorer(m) for m in members]
        names = [m.key for m in self.members]
        if len(set(names)) != len(names):
            raise ScorerError(f"ensemble members must differ, got {names}")
        self.reduce = reduce
        self.name = name or "ensemble"
        self.attributes = ["toxicity", *names]

    @property
    def key(self) -> str:
        return f"ensemble[{self.reduce}:{','.join(m.key for m in self.members)}]"

    def _score(self, texts: list[str], batch_size: int) -> dict[str, np.ndarray]:
        parts = {m.key: m.toxicity(texts, batch_size) for m in self.members}
        stack = np.stack(list(parts.values()))
        combined = stack.max(0) if self.reduce == "max" else stack.mean(0)
        return {"toxicity": combined, **parts}


# --- registry --------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., Scorer]] = {}
_ALIASES: dict[str, str] = {"default": DEFAULT_SCORER}
_CACHE: dict[str, Scorer] = {}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ScorerError(f"a scorer name must be a string, got {type(name).__name__}")
    n = name.strip().lower().replace("_", "-")
    return _ALIASES.get(n, n)


def _known(name: str) -> str:
    """The canonical name of a registered scorer; an unknown one is the registry's error."""
    n = _canonical(name)
    if n not in _FACTORIES:
        raise ScorerError(unknown("scorer", name, list_scorers()))
    return n


def register_scorer(name: str, factory: Callable[..., Scorer], overwrite: bool = False) -> None:
    """Make ``get_scorer(name, **kwargs)`` call ``factory(**kwargs)``. Names are case-insensitive
    (``_`` and ``-`` are the same); registering a taken name needs ``overwrite=True``."""
    n = _canonical(name)
    if n in _FACTORIES and not overwrite:
        raise ScorerError(f"a scorer named {n!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise ScorerError(f"the factory of scorer {n!r} must be callable, got {type(factory).__name__}")
    _FACTORIES[n] = factory
    _CACHE.pop(n, None)


def list_scorers() -> list[str]:
    """Registered scorer names (sorted), plus the ``default`` alias."""
    return sorted([*_FACTORIES, *_ALIASES])


def get_scorer(name: str | Scorer = "default", **kwargs) -> Scorer:
    """The scorer registered as ``name`` built with ``kwargs`` (a :class:`Scorer` passes through).

    ``"default"`` is :data:`DEFAULT_SCORER`. A scorer asked for without kwargs is built once and cached.
    Unknown names raise a :class:`ScorerError` that lists the registered ones.
    """
    if isinstance(name, Scorer):
        if kwargs:
            raise ScorerError(f"got a built scorer ({name.key!r}) and options {sorted(kwargs)}: pass one or the other")
        return name
    n = _known(name)
    if kwargs:
        return _build(n, kwargs)
    if n not in _CACHE:
        _CACHE[n] = _FACTORIES[n]()
    return _CACHE[n]


def _build(n: str, kwargs: dict) -> Scorer:
    """``_FACTORIES[n](**kwargs)`` with its options recorded (secrets left out); an error the factory
    raises, of any kind, is a one-line :class:`ScorerError` with secret-looking values masked."""
    secrets = [str(v) for k, v in kwargs.items() if is_secret_name(k) and v]
    problem = None
    try:
        scorer = _FACTORIES[n](**kwargs)
    except ScorerError as e:
        if not secrets:
            raise
        problem, kind = str(e), type(e)
    except (TypeError, ValueError) as e:
        problem, kind = f"scorer {n!r} could not be built with options {sorted(kwargs)}: {type(e).__name__}: {e}", \
            ScorerError
    if problem is not None:  # raised outside the handler, so no chained copy keeps a secret
        raise kind(redact(problem, secrets))
    scorer.options = {**public_options(kwargs), **scorer.options}
    return scorer


def scorer_identity(scorer: Scorer | None) -> dict:
    """What a run records about its scorer (what changes its numbers): ``{"scorer": name}``, plus
    ``"scorer_options"`` (secrets left out, URLs redacted) when it was built with any."""
    out: dict = {"scorer": getattr(scorer, "name", None)}
    options = getattr(scorer, "options", None)
    if options:
        out["scorer_options"] = dict(sorted(options.items()))
    return out


def _shown_option(opt: str) -> str:
    """A malformed ``--scorer-option`` as shown in an error: the value masked when the name looks secret."""
    m = re.match(r"([^:=]*)([:=])", opt)
    return f"{m.group(1)}{m.group(2)}{MASK}" if m and is_secret_name(m.group(1)) else opt


# --- scorers from command-line specs -------------------------------------------------------------

MAIN_ARGUMENTS: dict[str, str] = {"hf-classifier": "model", "detoxify": "checkpoint"}
"""The keyword that ``NAME:VALUE`` fills in :func:`scorer_from_spec`, per scorer (others have none)."""

# where the options of the built-in scorers are declared: (module, class), or () for "takes none"
_OPTION_SOURCES: dict[str, tuple[str, ...]] = {
    "jigsaw-bilstm": (".jigsaw", "JigsawBiLSTM"), "profanity": (".profanity", "ProfanityScorer"),
    "hf-classifier": (".hf", "HFClassifierScorer"), "detoxify": (".hf", "DetoxifyScorer"),
    "perspective": (".perspective", "PerspectiveScorer"), DEFAULT_SCORER: (),
}
BUILTIN_FACTORIES: dict[str, Callable[..., Scorer]] = {}
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?inf")
_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def scorer_options(name: str) -> list[str] | None:
    """The keyword options scorer ``name`` accepts (sorted), or None when its factory takes any
    keyword (``**kwargs``), so that they cannot be checked before it is called."""
    n = _known(name)
    target: Callable = _FACTORIES[n]
    if BUILTIN_FACTORIES.get(n) is target and n in _OPTION_SOURCES:
        if not _OPTION_SOURCES[n]:
            return []
        module, cls = _OPTION_SOURCES[n]
        target = getattr(importlib.import_module(module, __package__), cls)
    params = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return sorted(p.name for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def parse_option_value(text: str) -> bool | int | float | str:
    """A command-line option value: ``true``/``false`` (any case) -> bool, an integer -> int, a decimal
    or exponent number (or ``inf``) -> float, anything else -> the string unchanged."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if _INT.fullmatch(t):
        return int(t)
    if _FLOAT.fullmatch(t):
        return float(t)
    return text


def _split_spec(spec: str) -> tuple[str, str | None, str]:
    """(canonical name, main value or None, main keyword or '') of ``NAME[:VALUE]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ScorerError(f"a scorer spec must be a non-empty string NAME or NAME:VALUE, got {spec!r}")
    name, colon, value = spec.partition(":")
    n = _known(name)
    main = MAIN_ARGUMENTS.get(n, "")
    if not colon:
        return n, None, main
    if not main:
        with_main = ", ".join(f"{k}:{v.upper()}" for k, v in MAIN_ARGUMENTS.items())
        raise ScorerError(f"scorer {n!r} takes no main argument, so '{name}:{MASK}' (NAME:VALUE) is not valid; "
                          f"give options as KEY=VALUE instead (NAME:VALUE is for {with_main})")
    if not value:
        raise ScorerError(f"scorer spec {spec!r} has nothing after ':'; give {n}:{main.upper()} or just {n}")
    return n, value, main


def scorer_from_spec(spec: str, options: Sequence[str] = ()) -> Scorer:
    """Build a scorer from command-line text: ``spec`` is ``NAME`` or ``NAME:VALUE``, where VALUE goes
    to the scorer's main argument (:data:`MAIN_ARGUMENTS`: ``hf-classifier:MODEL``,
    ``detoxify:CHECKPOINT``), and each of ``options`` is ``KEY=VALUE`` (values read by
    :func:`parse_option_value`; ``-`` in a key is ``_``). A malformed option, a repeated or unknown
    keyword, or ``:VALUE`` for a scorer without a main argument is a :class:`ScorerError` that names it
    and lists the accepted keywords. Without options this is ``get_scorer(NAME)`` (cached)."""
    n, value, main = _split_spec(spec)
    if isinstance(options, str):
        options = [options]
    accepted = scorer_options(n)
    listing = ", ".join(accepted) if accepted else "(none)"
    kwargs: dict[str, object] = {} if value is None else {main: value}
    for opt in options:
        key, eq, raw = str(opt).partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not _KEYWORD.fullmatch(key):
            raise ScorerError(f"malformed option {_shown_option(str(opt))!r} for scorer {n!r}: expected KEY=VALUE; "
                              f"accepted keywords: {listing}")
        if accepted is not None and key not in accepted:
            raise ScorerError(f"scorer {n!r} has no option {key!r}; accepted keywords: {listing}")
        if key in kwargs:
            twice = f"{key!r} (also given as {n}:VALUE)" if key == main and value is not None else repr(key)
            raise ScorerError(f"option {twice} given twice for scorer {n!r}")
        kwargs[key] = parse_option_value(raw)
    return get_scorer(n, **kwargs)


def scorer_throughput(scorer: str | Scorer, texts: Sequence[str], batch_size: int | None = None,
                      warmup: int = 8) -> float:
    """Texts scored per second by ``scorer`` on ``texts`` (after building it and a warm-up call on the
    first ``warmup`` texts, so load time is not counted)."""
    s = get_scorer(scorer)
    texts = as_texts(texts)
    if not texts:
        raise ScorerError("scorer_throughput needs at least one text")
    s.score(texts[:warmup], batch_size)
    t0 = time.perf_counter()
    s.score(texts, batch_size)
    return len(texts) / (time.perf_counter() - t0)


def compare_scorers(a: str | Scorer, b: str | Scorer, texts: Sequence[str], threshold: float = 0.5) -> dict:
    """How two scorers' main attributes agree on ``texts``: Spearman and Pearson correlation, the share
    of texts both put on the same side of ``threshold``, Cohen's kappa of those decisions, and the share
    each flags (score >= threshold)."""
    from scipy.stats import pearsonr, spearmanr

    sa, sb = get_scorer(a), get_scorer(b)
    texts = as_texts(texts)
    if len(texts) < 2:
        raise ScorerError("compare_scorers needs at least two texts")
    x, y = sa.toxicity(texts), sb.toxicity(texts)
    fa, fb = x >= threshold, y >= threshold
    p_agree = float(np.mean(fa == fb))
    p_chance = float(fa.mean() * fb.mean() + (1 - fa.mean()) * (1 - fb.mean()))
    kappa = (p_agree - p_chance) / (1 - p_chance) if p_chance < 1 else float("nan")
    return {"n": len(texts), "spearman": float(spearmanr(x, y).statistic), "pearson": float(pearsonr(x, y).statistic),
            "agreement": p_agree, "kappa": kappa, "flagged_a": float(fa.mean()), "flagged_b": float(fb.mean())}
