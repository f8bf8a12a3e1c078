"""EigenShift: dampen the singular directions of the unembedding most aligned with toxic
generations (arXiv 2509.16660; METHODS.md section 3, with the public code's defects fixed).

With the thin SVD of the unembedding ``U = A diag(s) B^T`` (``U`` is ``[vocab, d]``; ``B^T`` is
``Vt``, ``[d, d]``), the coordinates of a ``final`` state ``h`` along the singular directions are
``p = Vt @ h`` (what ``s_i`` scales; the public code multiplies by ``Vt.T`` instead). From toxic and
non-toxic states (:mod:`steerlab.steer.toxic_states`), ``delta_i = mean_toxic(p_i) -
mean_nontoxic(p_i)``; the ``k`` directions with the largest ``|delta|`` are dampened (the paper ranks by
``delta`` itself, whose sign depends on the arbitrary sign of each singular pair: ``rank="signed"``
does that under a fixed sign convention), ``s_i <- alpha
s_i``, and ``U' = A diag(s') Vt``, computed as ``U + A_k diag(s'_k - s_k) Vt_k`` so that the other
directions keep their exact weights. ``k = ceil(d (1 - percentile))`` or given; ``d`` is the model's.

Applying corrects the logits by the rank-k change instead of swapping the weight: a hook on the
unembedding adds ``((h Vt_k^T) diag(s'_k - s_k)) A_k^T`` to its output ``h U^T`` (equal to ``h U'^T``
up to floating-point rounding; no weight is touched, so a tied input embedding never changes, and a
[vocab, d] matrix per setting is never built). Several settings share one batch through
:meth:`EigenShift.apply_rows`: each row gets its own setting's correction, computed exactly as
:meth:`EigenShift.apply` computes it for a batch of that setting alone. The file holds the dampened indices, their
original and new singular values and ``delta`` (not the matrix) plus fingerprints of the model and
of ``U``; loading recomputes the SVD of the model's ``U`` and checks both.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..interventions import Intervention, InterventionError, provenance, register, text_ids
from ..models.model import Model
from ..options import option
from ..registry import choose
from ..validate import NonFiniteError, number
from .svd import SVD, svd
from .toxic_states import ToxicStates, check_counts, collect_states


class EigenShiftError(InterventionError):
    """Bad EigenShift settings (k, percentile, alpha), states of the wrong size, or an edit file that
    does not match the model's unembedding."""


def projections(Vt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Coordinates of states ``h [n, d]`` (or one ``[d]``) along the singular directions: ``Vt @ h``."""
    return h.to(Vt.dtype) @ Vt.T


def choose_k(d: int, percentile: float | None = None, k: int | None = None) -> int:
    """Directions to dampen: ``k`` when given, else ``ceil(d (1 - percentile))`` (at least 1)."""
    if k is not None:
        if not 1 <= int(k) <= d:
            raise EigenShiftError(f"k={k} directions is out of range: the hidden size is d={d}, so 1 <= k <= {d}")
        return int(k)
    if percentile is None or not 0.0 <= percentile < 1.0:
        raise EigenShiftError(f"percentile must be in [0, 1) (k = ceil(d (1 - percentile))), got {percentile}")
    return max(1, math.ceil(round(d * (1.0 - percentile), 9)))


@dataclass
class Dampening:
    """What a fit computes: ``delta [d]`` per direction, the dampened ``indices [k]`` (largest delta
    first), their singular values before (``sigma``) and after (``sigma_new``)."""

    delta: torch.Tensor
    indices: torch.Tensor
    sigma: torch.Tensor
    sigma_new: torch.Tensor
    tstat: torch.Tensor | None = None


RANKS = ("abs", "signed", "t")


def welch_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Welch's t per column of ``a [n, k]`` against ``b [m, k]``: ``(mean_a - mean_b) /
    sqrt(var_a / n + var_b / m)`` (unbiased variances; a zero spread gives 0, not inf)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise EigenShiftError(f"rank='t' needs at least 2 toxic and 2 non-toxic states, got {a.shape[0]} and "
                              f"{b.shape[0]}")
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    diff = a.mean(0) - b.mean(0)
    return torch.where(se > 0, diff / se.clamp_min(1e-30), torch.zeros_like(diff))


PROJECTIONS = ("standard", "public")


def public_basis(U: torch.Tensor) -> torch.Tensor:
    """The rows the public code projects states on: it takes numpy's float32 SVD ``W = U S Vt`` of the
    unembedding (LAPACK's signs, no convention) and computes ``Vt.T @ h``, so its coordinate ``i`` is
    ``h`` dotted with *column* ``i`` of ``Vt``: the basis returned is ``Vt.T`` ``[d, d]`` (float64),
    for :func:`projections`. Not the coordinates ``s_i`` scales (those are ``Vt @ h``); kept to compare
    with the paper's published numbers, which came from it."""
    _, _, vt = np.linalg.svd(U.detach().float().cpu().numpy(), full_matrices=False)
    return torch.from_numpy(vt.T.astype(np.float64)).to(U.device)


def dampen(dec: SVD, toxic: torch.Tensor, nontoxic: torch.Tensor, k: int, alpha: float,
           rank: str = "abs", basis: torch.Tensor | None = None) -> Dampening:
    """delta_i = mean_toxic(p_i) - mean_nontoxic(p_i) with ``p = Vt @ h``; the ``k`` directions with
    the largest ``|delta|`` (``rank="abs"``), the largest ``delta`` (``"signed"``, the paper's rule,
    under :func:`svd`'s sign convention) or the largest ``|t|`` (``"t"``: Welch's t of the toxic against
    the non-toxic projections, the difference in units of its standard error, so that directions
    where the states merely spread widely do not win) are dampened to ``alpha * s_i``. ``basis``
    (default ``dec.Vt``) replaces the rows the states are projected on (:func:`public_basis`)."""
    choose("rank (abs: |delta|, signed: delta, t: |Welch's t|)", rank, RANKS, EigenShiftError)
    d = dec.Vt.shape[0]
    for name, h in (("toxic", toxic), ("non-toxic", nontoxic)):
        if h.dim() != 2 or h.shape[1] != d:
            raise EigenShiftError(f"{name} states have shape {tuple(h.shape)}; expected [n, {d}] (final states)")
        if h.shape[0] == 0:
            raise EigenShiftError(f"no {name} states: EigenShift needs at least one of each")
    k = choose_k(d, k=k)
    B = dec.Vt if basis is None else basis
    pt, pn = projections(B, toxic), projections(B, nontoxic)
    delta = pt.mean(0) - pn.mean(0)
    t = welch_t(pt, pn) if rank == "t" or (len(pt) > 1 and len(pn) > 1) else None
    idx = rank_key(rank, delta, t).topk(k).indices
    return Dampening(delta, idx, dec.s[idx], float(alpha) * dec.s[idx], t)


def rank_key(rank: str, delta: torch.Tensor, tstat: torch.Tensor | None) -> torch.Tensor:
    """What the directions are ranked by (largest first): ``|delta|``, ``delta`` or ``|t|``."""
    if rank == "t":
        if tstat is None:
            raise EigenShiftError("rank='t' needs the Welch t of each direction, which this edit does not hold "
                                  "(fitted from fewer than 2 states of a kind, or saved by an older steerlab): refit")
        return tstat.abs()
    return delta.abs() if rank == "abs" else delta


def edited_weight(U: torch.Tensor, dec: SVD, indices: torch.Tensor, sigma_new: torch.Tensor) -> torch.Tensor:
    """``A diag(s') Vt`` where ``s'`` is ``s`` with ``sigma_new`` at ``indices``, as ``U`` plus the
    rank-k change (in ``U``'s dtype and device)."""
    idx = indices.to(dec.s.device)
    change = (dec.A[:, idx] * (sigma_new.to(dec.s) - dec.s[idx])) @ dec.Vt[idx]
    return (U.detach().to(change.dtype) + change).to(U.dtype)


def matrix_fingerprint(W: torch.Tensor) -> str:
    """A hash of a matrix's bytes (identifies the unembedding an edit was fitted on)."""
    return hashlib.sha256(W.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


Correction = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]
"""One setting's logit correction: ``(rows or None for all, Vt_k [k, d], c [k], A_k [vocab, k])``."""


@contextmanager
def shifted_logits(model: Model, parts: Sequence[Correction]):
    """While the block runs, the unembedding's output gets ``((h Vt_k^T) * c) A_k^T`` added for each
    part, on the batch rows the part names (``None``: every row); the hook is removed on exit."""
    def hook(mod, args, kwargs, out):
        h = args[0] if args else next(iter(kwargs.values()))
        for rows, V, c, A in parts:
            x = h.contiguous() if rows is None else h.index_select(0, rows.to(h.device))
            corr = ((x.to(V.dtype) @ V.T) * c) @ A.T
            out = out + corr.to(out.dtype) if rows is None else out.index_add(0, rows.to(out.device), corr.to(out.dtype))
        return out

    handle = model.unembed_module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class EigenShiftFitOptions:
    prompts: str = option("rtp", "prompt set whose training split (seeded 60/20/20) is generated from")
    n_prompts: int = option(200, "training prompts to generate from (0: all)", low=0, unit="prompts")
    samples: int = option(4, "continuations per prompt", low=1)
    sampling: str = option("t1.0", "decoding of the collection", choices=("greedy", "t0.7", "t1.0"))
    max_new_tokens: int = option(20, "new tokens per continuation", low=1, unit="tokens")
    percentile: float = option(0.999, "k = ceil(d (1 - percentile)) directions are dampened", low=0.0, high=1.0)
    k: int = option(0, "dampen exactly k directions (overrides percentile; 0: use it)", low=0, unit="directions")
    alpha: float = option(0.1, "dampened singular values become alpha x s_i (0: removed)", low=0.0, high=1.0,
                          unit="x s_i")
    rank: str = option("abs", "abs: largest |delta| (sign-free); signed: largest delta (the paper); t: largest "
                       "|Welch's t| of the toxic against the non-toxic projections", choices=RANKS)
    projection: str = option("standard", "standard: coordinates Vt h (what s_i scales); public: the public "
                             "code's transposed Vt^T h with numpy's signs (the paper's published setting, not "
                             "recommended)", choices=PROJECTIONS)
    positions: str = option("first", "non-toxic states at: first (the first generated token, the paper) or "
                            "matched (positions drawn from those of the toxic states)", choices=("first", "matched"))
    scorer: str = option("default", "scorer labelling the continuations")
    threshold: float = option(0.5, "toxic when the scorer gives >= threshold", low=0.0, high=1.0)
    saliency: str = option("auto", "how toxic words are found", choices=("auto", "bilstm", "lexicon"))
    min_states: int = option(8, "fewest toxic (and non-toxic) states accepted", low=1, unit="states")
    batch_size: int = option(16, "rows per generate call", low=1)
    seed: int = option(0, "split and sampling seed")
    figures: str = option("", "also write the delta figure and the dampened directions' tokens to this directory")


@dataclass
class EigenShiftApplyOptions:
    alpha: float = option(None, "dampened singular values become alpha x s_i (default: the fitted alpha)",
                          type=float, low=0.0, high=1.0, unit="x s_i")
    percentile: float = option(None, "use only the first ceil(d (1 - percentile)) saved directions", type=float,
                               low=0.0, high=1.0)
    k: int = option(None, "use only the first k saved directions (largest |delta| first)", type=int, low=1,
                    unit="directions")
    rank: str = option(None, "re-rank all directions from the saved delta and t (abs, signed, t; default: the "
                       "fitted order of the saved directions)", type=str, choices=RANKS)


@register
@dataclass
class EigenShift(Intervention):
    """EigenShift: dampen the unembedding's singular directions most aligned with toxic generations."""

    indices: torch.Tensor
    sigma: torch.Tensor
    delta: torch.Tensor
    alpha: float = 0.1
    meta: dict = field(default_factory=dict)
    tstat: torch.Tensor | None = None
    method = "eigenshift"
    FitOptions = EigenShiftFitOptions
    ApplyOptions = EigenShiftApplyOptions
    strength_option = "alpha"

    def __post_init__(self):
        self.indices = torch.as_tensor(self.indices).long().cpu()
        self.sigma = torch.as_tensor(self.sigma).float().cpu()
        self.delta = torch.as_tensor(self.delta).float().cpu()
        self.tstat = None if self.tstat is None else torch.as_tensor(self.tstat).float().cpu()
        self.meta = {**self.meta, "sites": ["unembed"]}
        self._cache: dict = {}
        n, d = len(self.indices), self.meta.get("d_model")
        if self.indices.dim() != 1 or len(self.sigma) != n:
            raise EigenShiftError(f"an EigenShift edit needs one sigma per direction index, got indices of shape "
                                  f"{tuple(self.indices.shape)} and {len(self.sigma)} sigma values")
        if n and (int(self.indices.min()) < 0 or (d and int(self.indices.max()) >= int(d))):
            raise EigenShiftError(f"EigenShift direction indices must lie in [0, {d}) (the unembedding's singular "
                                  f"directions), got {int(self.indices.min())}..{int(self.indices.max())}")

    @classmethod
    def fit(cls, model: Model, data: ToxicStates | tuple | Sequence, percentile: float = 0.999, alpha: float = 0.1,
            k: int | None = None, rank: str = "abs", min_states: int = 8, projection: str = "standard",
            **collect) -> EigenShift:
        """Fit from ``data``: a :class:`~steerlab.steer.toxic_states.ToxicStates`, a ``(toxic, nontoxic)``
        pair of ``final`` states ``[n, d]``, or prompts (their states are collected with
        :func:`~steerlab.steer.toxic_states.collect_states` and ``collect``: cfg, scorer, threshold,
        saliency). ``k`` overrides ``percentile``; ``alpha`` scales the dampened singular values;
        ``rank``: ``abs`` (largest |delta|, sign-free), ``signed`` (largest delta) or ``t`` (largest |Welch t|); ``projection="public"``: the public
        code's transposed projection (:func:`public_basis`; with ``rank="signed"``, its exact choice)."""
        choose("projection", projection, PROJECTIONS, EigenShiftError)
        kk = choose_k(model.d_model, percentile, k)
        if not 0.0 <= alpha < 1.0:
            raise EigenShiftError(f"alpha must be in [0, 1) (the dampened s_i become alpha * s_i), got {alpha}")
        fitted: list[str] = []
        if isinstance(data, ToxicStates):
            states = data
        elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(x, torch.Tensor) for x in data):
            states = ToxicStates(data[0], data[1], {"toxic_states": len(data[0]), "nontoxic_states": len(data[1])})
        else:
            states = collect_states(model, data, min_states=min_states, **collect)
            fitted = text_ids([p if isinstance(p, str) else getattr(p, "text", "") for p in data])
        check_counts(states, min_states)
        U = model.unembed.weight
        basis = public_basis(U) if projection == "public" else None
        damp = dampen(svd(U), states.toxic.to(U.device), states.nontoxic.to(U.device), kk, alpha, rank, basis)
        meta = provenance(model, states.data_fingerprint,
                          {"k": kk, "alpha": alpha, "rank": rank, "projection": projection,
                           **({"percentile": percentile} if k is None else {})},
                          d_model=model.d_model, vocab_size=model.vocab_size,
                          unembed_fingerprint=matrix_fingerprint(U), tied=model.tied(), stats=states.stats,
                          **({"data_text_ids": fitted} if fitted else {}))
        return cls(damp.indices, damp.sigma, damp.delta, alpha, meta, damp.tstat)

    def check(self, model: Model, strict: bool = True) -> None:
        """Sizes always; the model and unembedding fingerprints when ``strict``."""
        d, v = self.meta.get("d_model"), self.meta.get("vocab_size")
        if (d, v) != (model.d_model, model.vocab_size):
            raise EigenShiftError(f"this EigenShift edit was fitted on {self.meta.get('model')!r} with an unembedding "
                                  f"of [{v}, {d}]; {model.name} has [{model.vocab_size}, {model.d_model}]")
        super().check(model, strict)
        fp = self.meta.get("unembed_fingerprint")
        if strict and fp and fp != matrix_fingerprint(model.W_U):
            raise EigenShiftError(f"the unembedding of {model.name} is not the one this edit was fitted on "
                                  f"(fingerprint {fp}); was it edited or retrained?")

    @classmethod
    def from_options(cls, model: Model, o: EigenShiftFitOptions) -> EigenShift:
        """``steerlab fit eigenshift``: states from the model's own scored continuations of training prompts."""
        from ..data import training_prompts
        from ..generation import GenConfig

        cfg = GenConfig(max_new_tokens=o.max_new_tokens, sampling=o.sampling, k=o.samples, seed=o.seed,
                        batch_size=o.batch_size)
        iv = cls.fit(model, training_prompts(o.prompts, o.n_prompts, o.seed), percentile=o.percentile,
                     alpha=o.alpha, k=o.k or None, rank=o.rank, min_states=o.min_states, projection=o.projection,
                     positions=o.positions, cfg=cfg, scorer=o.scorer,
                     threshold=o.threshold, saliency=o.saliency)
        if o.figures:
            from .eigenshift_report import report

            iv.written = [str(p) for p in report(model, iv, o.figures)]
        return iv

    def fit_summary(self) -> list[str]:
        st = self.meta["stats"]
        return [f"{st['continuations']} continuations ({st['toxic_continuations']} toxic): {st['toxic_states']} "
                f"toxic and {st['nontoxic_states']} non-toxic states ({st['saliency']} saliency); directions "
                f"{self.indices.tolist()[:12]}", *[f"wrote {p}" for p in getattr(self, "written", [])]]

    def n_directions(self, model: Model, percentile: float | None = None, k: int | None = None) -> int:
        """How many of the saved directions (largest |delta| first) an apply uses: all of them, or
        the first ``k`` / ``ceil(d (1 - percentile))``, which must not exceed the saved number."""
        if percentile is None and k is None:
            return len(self.indices)
        n = choose_k(model.d_model, percentile, k)
        if n > len(self.indices):
            raise EigenShiftError(f"this edit holds {len(self.indices)} directions but "
                                  f"{'k=' + str(k) if k is not None else f'percentile {percentile}'} asks for {n}: "
                                  f"refit with a lower --percentile or a larger --k")
        return n

    def order(self, model: Model, rank: str | None, percentile: float | None, k: int | None) -> torch.Tensor:
        """The directions an apply dampens: the first of the saved ones (``rank`` None: the fitted
        order), or the first ``k`` / ``ceil(d (1 - percentile))`` / as many as saved of all directions
        ranked by ``rank`` from the saved ``delta`` and ``t``."""
        if rank is None:
            return self.indices[:self.n_directions(model, percentile, k)]
        choose("rank", rank, RANKS, EigenShiftError)
        n = len(self.indices) if percentile is None and k is None else choose_k(model.d_model, percentile, k)
        return rank_key(rank, self.delta, self.tstat).topk(n).indices

    def weight(self, model: Model, alpha: float | None = None, n: int | None = None,
               indices: torch.Tensor | None = None) -> torch.Tensor:
        """The edited unembedding ``U'`` for ``model`` with the first ``n`` saved directions (default
        all; or the directions ``indices``) scaled by ``alpha`` (SVD recomputed once per model and cached)."""
        a = self.alpha if alpha is None else number(alpha, "EigenShift alpha")
        idx = self.indices[:len(self.indices) if n is None else int(n)] if indices is None else indices
        dec = self.decomposition(model)
        w = edited_weight(model.W_U, dec, idx, a * dec.s[idx.to(dec.s.device)])
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(f"EigenShift with alpha={a} makes the edited unembedding non-finite (NaN or "
                                 f"inf); use an alpha in [0, 1)")
        return w

    def decomposition(self, model: Model) -> SVD:
        """The SVD of ``model``'s unembedding (computed once per model and cached), checked against the
        saved singular values."""
        fp, dec = self._cache.get("svd", (None, None))
        if fp != model.fingerprint:
            dec = svd(model.W_U)
            found = dec.s[self.indices.to(dec.s.device)].float().cpu()
            if not torch.allclose(found, self.sigma, rtol=1e-3, atol=1e-5):
                raise EigenShiftError(f"the singular values of {model.name}'s unembedding at the saved "
                                      f"directions are {found[:4].tolist()}..., not {self.sigma[:4].tolist()}...: "
                                      f"this edit was fitted on another matrix")
            self._cache = {"svd": (model.fingerprint, dec)}
        return dec

    def correction(self, model: Model, alpha: float | None, percentile: float | None, k: int | None,
                   rank: str | None, rows: torch.Tensor | None = None) -> Correction:
        """One setting's logit correction (:func:`shifted_logits`) on ``rows`` (None: every row):
        the directions :meth:`order` chooses, each ``s_i`` changed to ``alpha s_i``."""
        a = self.alpha if alpha is None else number(alpha, "EigenShift alpha")
        dec = self.decomposition(model)
        idx = self.order(model, rank, percentile, k).to(dec.s.device)
        return rows, dec.Vt[idx], a * dec.s[idx] - dec.s[idx], dec.A[:, idx].contiguous()

    @contextmanager
    def apply(self, model: Model, *, alpha, percentile, k, rank, strict: bool = True):
        """Context manager: the logits are those of ``U'`` (singular values at the saved directions
        times ``alpha``, default the fitted one) while the body runs, through the rank-k correction of
        the unembedding's output (:func:`shifted_logits`; no weight changes). ``percentile`` or ``k``
        uses only the first ``ceil(d (1 - percentile))`` or ``k`` saved directions (the largest |delta|
        first), so one fit serves several settings; ``rank`` re-ranks all directions from the saved
        ``delta`` and ``t`` (:meth:`order`). Yields the correction."""
        self.check(model, strict)
        part = self.correction(model, alpha, percentile, k, rank)
        with shifted_logits(model, [part]):
            yield part

    def grid_groups(self, settings) -> list[list[int]]:
        """Every setting in one group: each is a per-row correction of the logits (:meth:`apply_rows`)."""
        return [list(range(len(settings)))]

    @contextmanager
    def apply_rows(self, model: Model, settings, row_setting, strict: bool = True):
        """Several settings in one batch: each row's logits get its own setting's correction, computed
        on that setting's rows as :meth:`apply` computes it on a batch of them."""
        self.check(model, strict)
        parts = [self.correction(model, o["alpha"], o["percentile"], o["k"], o["rank"],
                                 torch.nonzero(row_setting == j).flatten()) for j, o in enumerate(settings)]
        with shifted_logits(model, [p for p in parts if len(p[0])]):
            yield parts

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "sigma": self.sigma, "sigma_new": self.alpha * self.sigma,
                "delta": self.delta, **({"tstat": self.tstat} if self.tstat is not None else {})}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> EigenShift:
        for name in ("indices", "sigma", "delta"):
            if name not in tensors:
                raise EigenShiftError(f"EigenShift file lacks the tensor {name!r} (has {sorted(tensors)})")
        return cls(tensors["indices"], tensors["sigma"], tensors["delta"],
                   float((meta.get("options") or {}).get("alpha", 0.1)), meta, tensors.get("tstat"))
