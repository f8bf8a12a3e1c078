"""Steering vectors: directions at one or many sites, fitted from contrast data, added while the
model runs (Turner et al. 2023, "activation addition"; Rimsky et al. 2024, CAA; METHODS.md s1).

Fitting (``SteeringVector.fit``), per site, from desirable texts D and undesirable texts U:

- ``mean_diff``: s = mean_i h(D_i) - mean_i h(U_i) at the chosen positions: the last token,
  the mean over prompt tokens (``mean``), the mean without each text's first token
  (``mean_skip_first``), or ``aligned`` (paired texts, differences taken position by position
  from the end over the shorter text's length less its first token, then averaged).

  Leave the first token out of pools: in many models it carries an attention-sink activation
  orders of magnitude larger than the others. On SmolLM2-135M (middle layers) its norm is about
  23,000 against 150-450, so with ``mean`` the pooled difference mostly measures the two sets'
  different lengths along that one direction (cosine -0.93 with the mean first-token state at
  layer 12; ``mean_skip_first``: 0.12). See ``docs/steering.md``.
- ``pca``: the first right-singular vector of the paired differences h(D_i) - h(U_i)
  (uncentred, so the mean shift counts), signed to point from U to D.
- ``probe``: the weight vector of a logistic-regression probe separating D from U (sklearn).

``scale="unit"`` normalises each site's vector to norm 1 (the convention of the self-correction
code: alpha = +-20 with a unit vector); ``scale="raw"`` keeps the mean-difference scale (for pca
and probe, the unit direction times the mean difference's projection on it).

Applying adds ``alpha * s`` at each site (``where``: ``all`` positions, ``prompt`` positions
during prefill, ``generated`` positions, or the ``last`` position of every call); ``alpha`` may be
a ``[batch]`` tensor so a strength sweep is one batched generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..edits import Ablate, Clamp, Gated, OnRows, add
from ..errors import EmptyInputError
from ..hooks import capture, edit
from ..interventions import Intervention, InterventionError, contrast_texts, provenance, register, text_ids
from ..models.model import Model
from ..options import option
from ..positions import after_first, as_position
from ..registry import Registry, choose
from ..validate import number

POSITIONS = ("last", "mean", "mean_skip_first", "aligned")


class VectorError(InterventionError):
    """A steering vector that does not fit the model, or a file that is not one."""


@dataclass
class SteeringFitOptions:
    """What ``steerlab fit steering`` takes."""

    desirable: str = option("", "file of desirable texts (.txt/.jsonl/.csv); with undesirable, replaces the ranked prompts")
    undesirable: str = option("", "file of undesirable texts")
    prompts: str = option("rtp", "without desirable/undesirable: rank the training split of this prompt set by "
                          "toxicity and pair the least toxic with the most toxic")
    n_pairs: int = option(64, "contrast pairs taken from the ranked prompts", low=1, unit="pairs")
    layers: list = option(None, "layers whose blocks.{l}.resid_post get a direction (default: all)", type=list,
                          item=int)
    method: str = option("mean_diff", "direction fitter: mean_diff | pca | probe (FIT_METHODS)")
    positions: str = option("mean_skip_first", "token states pooled per text: last, mean, mean without the "
                            "first token (its attention-sink state dominates a mean), or aligned pairs",
                            choices=POSITIONS)
    scale: str = option("unit", "unit: norm-1 directions; raw: the mean difference's scale", choices=("unit", "raw"))
    scorer: str = option("default", "scorer that ranks the prompts (NAME or NAME:VALUE)")
    scorer_option: list = option([], "KEY=VALUE passed to the scorer (repeatable)", type=list, repeated=True)
    seed: int = option(0, "seed of the train/validation/test split the contrast set comes from")


@dataclass
class SteeringApplyOptions:
    """What ``SteeringVector.apply`` takes."""

    alpha: float = option(1.0, "add/gated: multiple of the saved direction added; ablate: share of the component "
                          "removed; clamp: level between the undesirable (0) and desirable (1) mean projections",
                          unit="x direction (activation units for a unit vector)")
    strength: float = option(None, "add/gated, instead of alpha: the added vector's norm as a multiple of the "
                             "site's typical token-state norm (median over the fitting texts; repeng-like "
                             "coefficients, 0.1-0.5 is strong)", type=float, unit="x typical norm")
    where: str = option("all", "schedule: positions edited", choices=("all", "prompt", "generated", "last"))
    mode: str = option("add", "add | gated (only where the state projects below the fitted midpoint) | ablate | "
                       "clamp (APPLY_MODES)")
    sites: list = option(None, "edit only these sites of the vector (default: all)", type=list)


@register
@dataclass
class SteeringVector(Intervention):
    """Steering vector: add alpha x a direction at one or more sites (activation addition, CAA)."""

    directions: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    method = "steering"
    FitOptions = SteeringFitOptions
    ApplyOptions = SteeringApplyOptions
    strength_option = "alpha"

    def __post_init__(self):
        if not self.directions:
            raise EmptyInputError("a steering vector needs at least one site")
        self.directions = {k: torch.as_tensor(v).detach().float().cpu() for k, v in self.directions.items()}
        bad = [k for k, v in self.directions.items() if not torch.isfinite(v).all()]
        if bad:
            raise VectorError(f"steering vector has non-finite (NaN or infinite) values at {', '.join(bad)}")
        self.meta = {**self.meta, "sites": list(self.directions)}

    # --- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, model: Model, data, undesirable: Sequence[str] | None = None,
            sites: str | Sequence[str] | None = None, method: str = "mean_diff",
            positions: str = "mean_skip_first", scale: str = "unit", chat: bool = False,
            batch_size: int = 16) -> SteeringVector:
        """Fit one direction per site pointing from undesirable to desirable activations.
        ``positions`` defaults to ``steerlab fit steering``'s: the mean over each text's tokens after
        the first (whose attention-sink state dominates a plain mean); also ``last``, ``mean``, ``aligned``.

        ``data`` is a :class:`steerlab.data.ContrastSet` or a ``(desirable, undesirable)`` pair (the
        protocol's ``fit(model, data, **options)``), or the desirable texts with ``undesirable``
        given next. ``method`` is a registered fit function (:data:`FIT_METHODS`)."""
        desirable, undesirable = _contrast(data, undesirable)
        if sites is None:
            raise VectorError("SteeringVector.fit needs sites (e.g. 'blocks.12.resid_post')")
        FIT_METHODS.check(method)
        choose("positions", positions, POSITIONS, VectorError)
        choose("scale", scale, ("unit", "raw"), VectorError)
        desirable, undesirable = list(desirable), list(undesirable)
        if not desirable or not undesirable:
            raise EmptyInputError(f"empty contrast set: {len(desirable)} desirable and {len(undesirable)} "
                                  f"undesirable texts; need at least one of each")
        paired = method == "pca" or positions == "aligned"
        if paired and len(desirable) != len(undesirable):
            raise VectorError(f"method {method!r} with positions {positions!r} needs paired texts, got "
                              f"{len(desirable)} desirable and {len(undesirable)} undesirable")
        names = [sites] if isinstance(sites, str) else list(sites)
        bound = [model.site(s) for s in names]
        for s in bound:
            if len(s.shape) != 1:
                raise VectorError(f"steering vectors live on d-dimensional sites; {s.name!r} has shape "
                                  f"{s.shape} (use resid/attn.out/mlp.out/final/embed or mlp.act)")
        canon = [s.name for s in bound]
        caps = capture(model, desirable + undesirable, canon, "all", batch_size=batch_size, chat=chat)
        keep = after_first(caps.mask)
        n = len(desirable)
        dirs, projection, typical = {}, {}, {}
        for s in canon:
            a = caps[s]
            if positions == "aligned":
                dirs[s] = direction(a[:n, -1], a[n:, -1], method, scale,
                                    diffs=_aligned_diffs(a[:n], keep[:n], a[n:], keep[n:]))
            else:
                x = as_position(positions).select(a, caps.mask)  # last, mean or mean_skip_first
                dirs[s] = direction(x[:n], x[n:], method, scale, paired=paired)
            projection[s] = _projection_means(a, keep, n, dirs[s])
            typical[s] = float(a[keep.to(a.device)].norm(dim=-1).median())
        meta = provenance(model, (desirable, undesirable),
                          {"fit_method": method, "positions": positions, "scale": scale},
                          data_text_ids=text_ids(desirable, undesirable),
                          projection=projection, typical_norm=typical, fit_method=method, positions=positions,
                          scale=scale, chat=chat, d_model=model.d_model, n_layers=model.n_layers,
                          model_type=model.config.model_type, n_desirable=len(desirable),
                          n_undesirable=len(undesirable))
        return cls(dirs, meta)

    @classmethod
    def from_options(cls, model: Model, o: SteeringFitOptions) -> SteeringVector:
        """``steerlab fit steering``: contrast texts from files, or ranked training prompts."""
        from ..data import ContrastSet, load_prompts
        from ..scoring import scorer_from_spec

        FIT_METHODS.check(o.method)
        if o.desirable or o.undesirable:
            data = ContrastSet([p.text for p in load_prompts(o.desirable)] if o.desirable else [],
                               [p.text for p in load_prompts(o.undesirable)] if o.undesirable else [])
        else:
            data = toxicity_contrast(o.prompts, scorer_from_spec(o.scorer, o.scorer_option), o.n_pairs, o.seed)
        sites = [f"blocks.{i}.resid_post" for i in (o.layers or range(model.n_layers))]
        return cls.fit(model, data, sites=sites, method=o.method, positions=o.positions, scale=o.scale)

    def fit_summary(self) -> list[str]:
        m = self.meta
        return [f"{len(self.directions)} directions ({m.get('fit_method')}, {m.get('positions')}, {m.get('scale')}) "
                f"from {m.get('n_desirable')} desirable / {m.get('n_undesirable')} undesirable texts"]

    # --- applying ------------------------------------------------------------------------------
    def check(self, model: Model, strict: bool = True) -> None:
        """Raise when the vector does not fit ``model``: size always; fingerprint when ``strict``."""
        self.check_sizes(model, self.directions, "vector", VectorError)
        super().check(model, strict)

    def fixed_text_options(self, options: dict) -> dict:
        """Side effects on fixed text are measured with the edit at every position: a teacher-forced
        pass has no generated positions, so a ``generated`` (or ``last``) schedule would edit nothing
        there, while in generation it edits every new token."""
        return {**options, "where": "all"}

    @contextmanager
    def apply(self, model: Model, *, alpha, strength, where, mode, sites, strict: bool = True):
        """Context manager: change every site along its direction while the body runs.

        ``mode`` (:data:`APPLY_MODES`): ``add`` adds ``alpha * direction`` (activation addition);
        ``gated`` adds it only at positions whose projection on the unit direction is below the
        threshold fitted on the training data (the midpoint of the desirable and undesirable mean
        projections of token states, first tokens left out: the state looks undesirable); ``ablate`` removes ``alpha`` times the component
        along the direction (directional ablation; ``alpha=1`` removes it all); ``clamp`` raises the
        projection to at least ``undesirable mean + alpha x (desirable mean - undesirable mean)`` of
        the fitted projections (``alpha=1``: the desirable texts' mean; ``0.5``: the midpoint). The gated, ablate and clamp modes
        leave each row's first token alone (its attention-sink state is what the model expects
        there; removing or clamping a component of it breaks the model). ``sites`` restricts the
        edit to some of the vector's sites. ``strength`` (add, gated) replaces ``alpha`` by the
        added vector's norm in units of the site's typical token-state norm (:data:`SteeringApplyOptions`)."""
        self.check(model, strict)
        with edit(model, self.edits(alpha, strength, where, mode, sites)) as step:
            yield step

    def edits(self, alpha, strength, where: str, mode: str, sites) -> dict:
        """The edit of each site for one setting of :meth:`apply`'s options."""
        directions = self.only(list(sites)).directions if sites is not None else self.directions
        alphas = {s: alpha for s in directions} if strength is None else self.relative(strength, mode, directions)
        return {s: APPLY_MODES[mode](v, alphas[s], where, (self.meta.get("projection") or {}).get(s))
                for s, v in directions.items()}

    def grid_groups(self, settings) -> list[list[int]]:
        """Every setting in one group: each row gets its own setting's edits (:meth:`apply_rows`)."""
        return [list(range(len(settings)))]

    @contextmanager
    def apply_rows(self, model: Model, settings, row_setting, strict: bool = True):
        """Several settings in one batch: each setting's edits (any sites, modes, schedules and
        strengths) act on its own rows only; the other rows pass through them unchanged, bit for bit."""
        self.check(model, strict)
        fns: dict[str, list] = {}
        for j, o in enumerate(settings):
            own = self.edits(o["alpha"], o["strength"], o["where"], o["mode"], o["sites"])  # checked even if unused
            for s, fn in own.items() if bool((row_setting == j).any()) else ():
                fns.setdefault(s, []).append(OnRows(fn, row_setting == j))
        with edit(model, fns) as step:
            yield step

    def relative(self, strength, mode: str, directions: dict[str, torch.Tensor]) -> dict:
        """Per site, the alpha whose added vector has norm ``strength`` x the site's typical norm."""
        typical = self.meta.get("typical_norm") or {}
        if mode not in ("add", "gated"):
            raise VectorError(f"strength is a size of the added vector (modes add and gated); mode {mode!r} takes alpha")
        missing = [s for s in directions if s not in typical]
        if missing:
            raise VectorError(f"this vector has no typical norm for {missing[0]!r} (fitted before steerlab stored "
                              "them, or derived); refit it or give alpha")
        return {s: strength * typical[s] / float(v.norm().clamp_min(1e-12)) for s, v in directions.items()}


    def _derived(self, dirs: dict[str, torch.Tensor], levels: dict | None, **note) -> SteeringVector:
        meta = {k: v for k, v in self.meta.items() if k != "projection"}
        return SteeringVector(dirs, {**meta, **note, **({"projection": levels} if levels else {})})

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            raise VectorError(f"cannot {'add' if sign > 0 else 'subtract'} a {type(other).__name__} and a steering "
                              f"vector: combine two SteeringVectors, or scale one with a number (2.0 * v)")
        fa, fb = self.meta.get("model_fingerprint"), other.meta.get("model_fingerprint")
        if fa and fb and fa != fb:
            raise VectorError(f"cannot combine vectors fitted on different models ({self.meta.get('model')!r} "
                              f"{fa} and {other.meta.get('model')!r} {fb})")
        dirs = dict(self.directions)
        for s, v in other.directions.items():
            if s in dirs and dirs[s].shape != v.shape:
                raise VectorError(f"cannot combine vectors of sizes {tuple(dirs[s].shape)} and {tuple(v.shape)} at {s!r}")
            dirs[s] = dirs[s] + sign * v if s in dirs else sign * v
        return self._derived(dirs, None, derived=f"combination ({'+' if sign > 0 else '-'})")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, c: float) -> SteeringVector:
        c = number(c, "the factor a steering vector is multiplied by")
        levels = self.meta.get("projection") or None
        if levels and c < 0:
            levels = {s: _swapped(p) for s, p in levels.items()}
        return self._derived({s: v * c for s, v in self.directions.items()}, levels if c != 0 else None)

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def with_levels(self, model: Model, data, undesirable: Sequence[str] | None = None, chat: bool = False,
                    batch_size: int = 16) -> SteeringVector:
        """The same directions with the projection levels recomputed from contrast texts (``data`` as in
        :meth:`fit`): what a sum or a control needs before ``gated`` or ``clamp``."""
        desirable, undesirable = _contrast(data, undesirable)
        if not desirable or not undesirable:
            raise EmptyInputError("with_levels needs at least one desirable and one undesirable text")
        sites = list(self.directions)
        caps = capture(model, desirable + undesirable, sites, "all", batch_size=batch_size, chat=chat)
        keep = after_first(caps.mask)
        levels = {s: _projection_means(caps[s], keep, len(desirable), self.directions[s].to(caps[s].device))
                  for s in sites}
        return self._derived(dict(self.directions), levels)

    def only(self, sites: str | Sequence[str]) -> SteeringVector:
        """The same vector restricted to some sites."""
        names = [sites] if isinstance(sites, str) else list(sites)
        missing = [s for s in names if s not in self.directions]
        if missing:
            raise VectorError(f"sites {missing} not in this vector (it has {', '.join(self.directions)})")
        return SteeringVector({s: self.directions[s] for s in names}, dict(self.meta))

    def norms(self) -> dict[str, float]:
        return {s: float(v.norm()) for s, v in self.directions.items()}

    def cosine(self, x: torch.Tensor | SteeringVector, site: str | None = None) -> torch.Tensor | dict[str, float]:
        """Cosine similarity of each site's direction with another vector's (dict), or of one site's
        direction with the rows of a tensor ``[..., d]``."""
        if isinstance(x, SteeringVector):
            return {s: float(torch.nn.functional.cosine_similarity(v, x.directions[s], dim=0))
                    for s, v in self.directions.items() if s in x.directions}
        v = self.directions[site] if site else next(iter(self.directions.values()))
        return torch.nn.functional.cosine_similarity(x.float(), v.to(x.device).expand_as(x), dim=-1)

    # --- controls ------------------------------------------------------------------------------
    def permuted(self, seed: int = 0) -> SteeringVector:
        """Control: each site's coordinates randomly permuted (same norm and value distribution)."""
        g = torch.Generator().manual_seed(seed)
        return self._derived({s: v[torch.randperm(v.numel(), generator=g)] for s, v in self.directions.items()},
                             None, control=f"permuted(seed={seed})")

    def random(self, seed: int = 0) -> SteeringVector:
        """Control: a Gaussian random direction per site with the same norm."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for s, v in self.directions.items():
            r = torch.randn(v.shape, generator=g)
            out[s] = r / r.norm() * v.norm()
        return self._derived(out, None, control=f"random(seed={seed})")

    # --- files (safetensors + header through the Intervention protocol) -------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.directions)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> SteeringVector:
        return cls(tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None, strict: bool = True) -> SteeringVector:
        """Read a vector saved by :meth:`save`; with ``model``, check that it fits (sizes, fingerprint)."""
        sv = super().load(path)
        if model is not None:
            sv.check(model, strict)
        return sv  # type: ignore[return-value]

    def to_gguf(self, path: str | Path) -> Path:
        """Export as a llama.cpp control vector (``--control-vector``): tensors ``direction.{l}``
        for ``blocks.{l}.resid_post`` (llama.cpp adds direction ``l`` to the output of block ``l``,
        at every position; it has no slot for block 0)."""
        import gguf

        layers = {}
        for s, v in self.directions.items():
            parts = s.split(".")
            if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "resid_post":
                raise VectorError(f"llama.cpp control vectors hold resid_post directions only; {s!r} cannot be exported")
            if int(parts[1]) == 0:
                raise VectorError("llama.cpp control vectors have no slot for block 0 (direction.0 is rejected)")
            layers[int(parts[1])] = v.numpy().astype(np.float32)
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            w = gguf.GGUFWriter(str(path), "controlvector")
            w.add_string("controlvector.model_hint", self.meta.get("model_type", "llama"))
            w.add_uint32("controlvector.layer_count", len(layers))
            for layer in sorted(layers):
                w.add_tensor(f"direction.{layer}", layers[layer])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        except OSError as e:  # read-only, a file where a directory should be, a full disk
            path.unlink(missing_ok=True) if path.is_file() else None
            raise VectorError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def from_gguf(cls, path: str | Path) -> SteeringVector:
        """Read a llama.cpp control vector back (``direction.{l}`` -> ``blocks.{l}.resid_post``)."""
        import gguf

        try:
            r = gguf.GGUFReader(str(path))
        except Exception as e:
            raise VectorError(f"{path} is not a readable GGUF control vector ({type(e).__name__}: {e})") from None
        dirs = {}
        for t in r.tensors:
            if not t.name.startswith("direction."):
                continue
            dirs[f"blocks.{int(t.name.split('.')[1])}.resid_post"] = torch.from_numpy(np.array(t.data, dtype=np.float32))
        if not dirs:
            raise VectorError(f"{path} is a GGUF file without control-vector tensors (direction.<layer>)")
        hint = r.fields.get("controlvector.model_hint")
        mt = bytes(hint.parts[-1]).decode() if hint is not None else None
        return cls(dirs, {"model_type": mt, "source": str(path)})


def direction(hd: torch.Tensor, hu: torch.Tensor, method: str = "mean_diff", scale: str = "unit",
              paired: bool = False, diffs: torch.Tensor | None = None) -> torch.Tensor:
    """One direction from desirable ``hd [n, d]`` and undesirable ``hu [m, d]`` activations.

    ``mean_diff``: mean(hd) - mean(hu) (or the mean of given paired ``diffs``); ``pca``: first
    right-singular vector of the paired differences, signed along the mean difference;
    ``probe``: logistic-regression weights (in activation coordinates). ``unit`` scale gives norm
    1; ``raw`` gives the mean difference (pca/probe: unit direction times the mean difference's
    projection on it)."""
    if diffs is None and (paired or method == "pca"):
        if hd.shape != hu.shape:
            raise VectorError(f"paired differences need equal shapes, got {tuple(hd.shape)} and {tuple(hu.shape)}")
        diffs = hd - hu
    mean_diff = diffs.mean(0) if diffs is not None else hd.mean(0) - hu.mean(0)
    v = FIT_METHODS[method](hd, hu, diffs, mean_diff)
    if scale == "unit" or method != "mean_diff":
        v = v / v.norm().clamp_min(1e-12)
        if scale == "raw":
            v = v * (mean_diff @ v)
    return v


def _aligned_diffs(a_d: torch.Tensor, m_d: torch.Tensor, a_u: torch.Tensor, m_u: torch.Tensor) -> torch.Tensor:
    """Per pair: mean over positions (aligned from the end, over the shorter of the two kept
    lengths; masks ``[N, T]`` mark the kept tokens, e.g. :func:`after_first`) of h_d - h_u."""
    L = torch.minimum(m_d.sum(1), m_u.sum(1))  # [N]
    T = a_d.shape[1]
    cols = torch.arange(T, device=a_d.device)[None, :]
    keep = (cols >= T - L[:, None]).to(a_d.dtype)[..., None]  # last L columns of each row
    return ((a_d - a_u) * keep).sum(1) / L[:, None].to(a_d.dtype)


FitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
FIT_METHODS: Registry = Registry("method", VectorError)
"""Direction fitters by name: ``fn(hd, hu, paired_diffs or None, mean_diff) -> direction [d]``.
Add one with :func:`register_fit_method`."""


def register_fit_method(name: str):
    """Decorator registering a direction fitter (see :data:`FIT_METHODS`)."""
    return FIT_METHODS.register(name)


@register_fit_method("mean_diff")
def _mean_diff_direction(hd, hu, diffs, mean_diff) -> torch.Tensor:
    """Difference of means (or mean of paired differences)."""
    return mean_diff


@register_fit_method("pca")
def _pca_direction(hd, hu, diffs, mean_diff) -> torch.Tensor:
    """First right-singular vector of the paired differences, signed along the mean difference."""
    v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    return v * torch.sign(v @ mean_diff)


@register_fit_method("probe")
def _probe_direction(hd: torch.Tensor, hu: torch.Tensor, diffs=None, mean_diff=None) -> torch.Tensor:
    """Logistic-regression weights (standardised features, mapped back to activation coordinates)."""
    from sklearn.linear_model import LogisticRegression

    X = torch.cat([hd, hu]).cpu().numpy()
    y = np.r_[np.ones(len(hd)), np.zeros(len(hu))]
    mu, sd = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((X - mu) / sd, y)
    w = clf.coef_[0] / sd  # back to activation coordinates
    return torch.from_numpy(w).float().to(hd.device)


def _projection_means(acts: torch.Tensor, keep: torch.Tensor, n: int, v: torch.Tensor) -> dict[str, float]:
    """Mean projection on the unit direction of the desirable (first ``n`` texts) and undesirable
    texts' token states ``acts [N, T, d]``, over the tokens ``keep [N, T]`` marks (every real token
    but the first): the level the gated and clamp edits compare each position's state with."""
    proj = acts.float() @ (v / v.norm().clamp_min(1e-12)).to(acts.device)  # [N, T]
    k = keep.to(proj.device)
    return {"desirable": float(proj[:n][k[:n]].mean()), "undesirable": float(proj[n:][k[n:]].mean()),
            "desirable_std": float(proj[:n][k[:n]].std()), "undesirable_std": float(proj[n:][k[n:]].std()),
            "states": "tokens after the first"}


def _swapped(p: dict) -> dict:
    """The projection levels on the opposite direction: the desirable and undesirable roles swapped."""
    return {**p, "desirable": -p["undesirable"], "undesirable": -p["desirable"],
            "desirable_std": p.get("undesirable_std"), "undesirable_std": p.get("desirable_std")}


def _level(proj: dict | None, key: str) -> float:
    if not proj:
        raise VectorError("this vector has no fitted projection statistics (a sum, a random or permuted control, "
                          "or a vector not made by SteeringVector.fit); gated and clamp modes need them: fit the "
                          "vector, or recompute them with vector.with_levels(model, data)")
    return proj[key] if key in ("desirable", "undesirable") else 0.5 * (proj["desirable"] + proj["undesirable"])


APPLY_MODES: Registry = Registry("mode", VectorError)
APPLY_MODES.update({
    "add": lambda v, alpha, where, proj: add(v, alpha=alpha, where=where),
    "gated": lambda v, alpha, where, proj: Gated(v, alpha, where, _level(proj, "midpoint")),
    "ablate": lambda v, alpha, where, proj: Ablate(v, alpha, where),
    "clamp": lambda v, alpha, where, proj: Clamp(v, alpha, where, _level(proj, "desirable"), _level(proj, "undesirable")),
})
"""How :meth:`SteeringVector.apply` changes a site: ``fn(direction, alpha, where, projection stats) -> edit``."""


def _contrast(data, undesirable) -> tuple[list[str], list[str]]:
    """(desirable, undesirable) texts from a ContrastSet, a pair, or two lists."""
    if undesirable is not None:
        return list(data), list(undesirable)
    try:
        return contrast_texts(data, "steering data (or desirable texts with undesirable= given)")
    except InterventionError as e:
        raise VectorError(str(e)) from None


def toxicity_contrast(prompts: str = "rtp", scorer=None, n_pairs: int = 64, seed: int = 0):
    """The default training data of a toxicity steering vector: the training split (seeded 60/20/20
    by prompt) of a prompt set, scored, the least toxic paired with the most toxic
    (:func:`steerlab.data.contrast_from_scores`); the vector then points from toxic to non-toxic."""
    from ..data import contrast_from_scores, load_prompts, split
    from ..scoring import get_scorer

    train = [p.text for p in split(load_prompts(prompts), seed=seed)["train"]]
    sc = scorer if scorer is not None else get_scorer()
    return contrast_from_scores(train, sc.toxicity(train), n=n_pairs, source=f"{prompts}:train")
