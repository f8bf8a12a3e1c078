"""Inference-time intervention (ITI; Li et al. 2023, METHODS.md section 5): shift a few attention
heads along the direction that separates desirable from undesirable activations.

Fitting: logistic probes at every (layer, head) on the last-token head activations of labelled
texts (:mod:`steerlab.explain.probes`, split by prompt), the top ``k`` heads by validation accuracy,
and for each of them the centre-of-mass direction ``theta = mean(desirable) - mean(undesirable)``
(unit norm) and ``sigma``, the standard deviation of the training activations projected on it.

Applying: ``a_{l,h} <- a_{l,h} + alpha * sigma * theta`` on the chosen heads of ``blocks.{l}.attn.heads``
(the input of the attention output projection) at the last position of every forward call (the
``last`` schedule: the last prompt token, then every generated token); the other heads are untouched.
``bake=True`` writes the same shift, at every position, into the output projection's bias:
``bias += W_o @ delta`` (the bias is created when the layer has none, and restored exactly on exit).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..edits import add
from ..explain.probes import Labelled, ProbeData, probe_data, probe_heads
from ..hooks import edit
from ..interventions import Intervention, InterventionError, groups_by, provenance, register
from ..models.model import Model
from ..options import option


class ITIError(InterventionError):
    """An ITI intervention that cannot be fitted or does not fit the model."""


def heads_site(layer: int) -> str:
    return f"blocks.{layer}.attn.heads"


def check_head_sites(method: str, tensors: dict[str, torch.Tensor], model: Model, meta: dict) -> None:
    """Raise when per-head tensors ``{site: [H, ...d_head]}`` do not match ``model``'s layers and heads."""
    shape = (model.n_heads, model.d_head)
    for s, t in tensors.items():
        layer = int(s.split(".")[1])
        if layer >= model.n_layers or tuple(t.shape[:2]) != shape:
            raise InterventionError(
                f"this {method} file was fitted on {meta.get('model', '?')!r} ({s}: heads x d_head "
                f"{tuple(t.shape[:2])}); {model.name!r} has {model.n_layers} layers of {shape[0]} heads x "
                f"{shape[1]}")


def resample(pd: ProbeData, gen: torch.Generator) -> ProbeData:
    """A bootstrap resample of probe data: the rows of each part drawn with replacement, within each
    class (both classes keep their counts)."""
    heads, labels = {}, {}
    for part, y in pd.labels.items():
        rows = []
        for cls in (0.0, 1.0):
            members = torch.nonzero(y.cpu() == cls).flatten()
            rows.append(members[torch.randint(len(members), (len(members),), generator=gen)])
        r = torch.cat(rows).to(y.device)
        heads[part], labels[part] = pd.heads[part][:, r], y[r]
    return ProbeData(pd.layers, heads, {}, labels, dict(pd.meta))


def head_stability(pd: ProbeData, top: list[tuple[int, int]], l2: float, n: int, seed: int = 0) -> dict:
    """How stable the chosen heads ``top`` are: over ``n`` bootstrap resamples of the probe data
    (:func:`resample`; the probes refitted and the top heads chosen again), the share of resamples in
    which each chosen head is again among the top ``len(top)`` (``per_head``) and the mean share of the
    chosen heads kept (``mean_kept``)."""
    gen = torch.Generator().manual_seed(seed)
    hits = dict.fromkeys(top, 0)
    for _ in range(n):
        again = set(probe_heads(resample(pd, gen), l2).top_heads(len(top)))
        for h in top:
            hits[h] += h in again
    per = {f"{layer}.{h}": round(c / n, 3) for (layer, h), c in hits.items()}
    return {"resamples": n, "seed": seed, "per_head": per, "mean_kept": round(sum(per.values()) / len(per), 3)}


def centre_of_mass(acts: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per problem ``acts [K, N, d]`` with labels ``y [N]`` (1 = undesirable): the unit direction
    ``mean(y=0) - mean(y=1)`` ``[K, d]`` and the std of all training projections on it ``[K]``."""
    d = acts[:, y < 0.5].mean(1) - acts[:, y > 0.5].mean(1)
    norm = d.norm(dim=-1, keepdim=True)
    if (norm < 1e-12).any():
        raise ITIError("a head's desirable and undesirable activations have the same mean: no direction")
    theta = d / norm
    sigma = torch.einsum("knd,kd->kn", acts, theta).std(1)
    return theta, sigma


@dataclass
class LabelledDataOptions:
    """The labelled prompts ITI, SLIM and ``steerlab probes`` learn from."""

    prompts: str = option("rtp", "prompt set whose training and validation parts (seeded 60/20/20 split by "
                          "prompt) are scored; in each part the most toxic are labelled toxic, the least non-toxic")
    n_train: int = option(64, "texts per class from the training part", low=2, unit="texts")
    n_val: int = option(32, "texts per class from the validation part", low=2, unit="texts")
    scorer: str = option("default", "scorer that labels the prompts (NAME or NAME:VALUE)")
    scorer_option: list = option([], "KEY=VALUE passed to the scorer (repeatable)", type=list, repeated=True)
    seed: int = option(0, "seed of the split")
    layers: list = option(None, "layers to probe (default: all)", type=list, item=int)

    def labelled(self):
        from ..explain.probes import toxicity_labels
        from ..scoring import scorer_from_spec

        return toxicity_labels(self.prompts, scorer_from_spec(self.scorer, self.scorer_option), self.n_train,
                               self.n_val, self.seed)


@dataclass
class ITIFitOptions(LabelledDataOptions):
    k: int = option(16, "heads to shift (the top K by validation accuracy; ties: higher AUROC, then earlier "
                    "layer, then lower head)", low=1, unit="heads")
    bootstrap: int = option(8, "bootstrap resamples of the probe data measuring how stable the chosen heads are "
                            "(0: none)", low=0, unit="resamples")


@dataclass
class ITIApplyOptions:
    alpha: float = option(15.0, "shift of each chosen head along its centre-of-mass direction, in multiples of "
                          "the head's training std along it (the paper: 15)", unit="x head std")
    where: str = option(None, "positions shifted at runtime (default last: the last position of every call; "
                        "with bake: all)", type=str, choices=("last", "all", "prompt", "generated"))
    bake: bool = option(False, "write the shift into the output projections' biases (every position) "
                        "instead of a runtime hook")


@register
@dataclass
class ITI(Intervention):
    """Inference-time intervention: shift the top-K heads by alpha x sigma along the centre of mass."""

    deltas: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    method = "iti"
    FitOptions = ITIFitOptions
    ApplyOptions = ITIApplyOptions
    strength_option = "alpha"

    def __post_init__(self):
        if not self.deltas:
            raise ITIError("an ITI intervention needs at least one head")
        self.deltas = {k: torch.as_tensor(v).detach().float().cpu() for k, v in self.deltas.items()}
        self.meta = {**self.meta, "sites": list(self.deltas)}

    @classmethod
    def fit(cls, model: Model, data: Labelled | ProbeData, k: int = 16, l2: float = 1e-2,
            layers=None, batch_size: int = 16, chat: bool = False, bootstrap: int = 0, seed: int = 0) -> ITI:
        """Probe every head on ``data`` (labelled texts, or activations from :func:`probe_data`), keep
        the ``k`` most accurate on validation (ties: :meth:`~steerlab.explain.probes.HeadProbes.top_heads`),
        and store ``sigma * theta`` for each. ``bootstrap > 0`` records in ``meta["stability"]`` how
        often each chosen head is chosen again over that many resamples (:func:`head_stability`)."""
        pd = data if isinstance(data, ProbeData) else probe_data(model, data, layers, resid=False,
                                                                 batch_size=batch_size, chat=chat)
        pd.check(model)
        res = probe_heads(pd, l2)
        top = res.top_heads(k)
        li = torch.tensor([pd.layers.index(layer) for layer, _ in top], device=res.w.device)
        hi = torch.tensor([h for _, h in top], device=res.w.device)
        acts = pd.heads["train"][li, :, hi]  # [K, N, d_head]
        theta, sigma = centre_of_mass(acts, pd.labels["train"])
        deltas: dict[str, torch.Tensor] = {}
        for j, (layer, h) in enumerate(top):
            d = deltas.setdefault(heads_site(layer), torch.zeros(model.n_heads, model.d_head))
            d[h] = (sigma[j] * theta[j]).cpu()
        heads = [{"layer": layer, "head": h, "accuracy": round(float(res.head_acc[pd.layers.index(layer), h]), 4),
                  "sigma": round(float(sigma[j]), 5)} for j, (layer, h) in enumerate(top)]
        meta = provenance(model, pd.meta.get("data_fingerprint"), {"k": k, "l2": l2},
                          data_text_ids=pd.meta.get("data_text_ids"),
                          model_type=model.config.model_type, source=pd.meta.get("source"),
                          counts=pd.meta.get("counts"), heads=heads,
                          tie_break="validation accuracy, then AUROC, then the earlier layer, then the lower head",
                          **({"stability": head_stability(pd, top, l2, bootstrap, seed)} if bootstrap else {}))
        return cls(deltas, meta)

    def check(self, model: Model, strict: bool = True) -> None:
        check_head_sites(self.method, self.deltas, model, self.meta)
        super().check(model, strict)

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The chosen (layer, head) pairs."""
        return [(int(s.split(".")[1]), int(h)) for s, d in self.deltas.items()
                for h in torch.nonzero(d.abs().sum(-1)).flatten().tolist()]

    def fixed_text_options(self, options: dict) -> dict:
        """Every position: one teacher-forced pass then equals generating the text token by token with
        the last-position edit (tested); at the last position only, a pass over fixed text would show
        almost no side effect by construction."""
        return {**options, "where": "all"}

    @classmethod
    def from_options(cls, model: Model, o: ITIFitOptions) -> ITI:
        """``steerlab fit iti``: probes on labelled prompts, the top K heads."""
        return cls.fit(model, o.labelled(), k=o.k, layers=o.layers, bootstrap=o.bootstrap, seed=o.seed)

    def fit_summary(self) -> list[str]:
        best = ", ".join(f"{h['layer']}.{h['head']} ({h['accuracy']:.2f})" for h in self.meta["heads"][:5])
        st = self.meta.get("stability")
        return [f"top heads (layer.head, validation accuracy): {best}"] + \
            ([f"chosen heads kept over {st['resamples']} bootstrap resamples: {st['mean_kept']:.0%} on average"]
             if st else [])

    @contextmanager
    def apply(self, model: Model, *, alpha, where, bake, strict: bool = True):
        """Shift the chosen heads by ``alpha * sigma * theta``: at runtime at the ``where`` positions
        (default ``last``: the last position of every call; ``alpha`` may be a ``[batch]`` tensor), or
        with ``bake=True`` through the output projections' biases at every position."""
        self.check(model, strict)
        if not bake:
            with edit(model, {s: add(d, alpha, where or "last") for s, d in self.deltas.items()}) as step:
                yield step
            return
        if where not in (None, "all"):
            raise ITIError(f"a baked shift acts at every position; where={where!r} needs the runtime edit (bake=False)")
        if isinstance(alpha, torch.Tensor) and alpha.dim() > 0:
            raise ITIError("a baked shift takes one scalar alpha, not one per row")
        with bake_shifts(model, {s: float(alpha) * d for s, d in self.deltas.items()}):
            yield None

    def grid_groups(self, settings) -> list[list[int]]:
        """Runtime settings with the same schedule share a batch (one alpha per row); baked ones stay alone."""
        return groups_by([self.apply_options(dict(s)) for s in settings],
                         lambda o: None if o["bake"] else o["where"] or "last")

    def apply_rows(self, model: Model, settings, row_setting, strict: bool = True):
        """Settings that differ in ``alpha`` only: the runtime edit with one alpha per row."""
        if any(o["bake"] for o in settings) or len({o["where"] or "last" for o in settings}) > 1:
            raise ITIError("ITI settings share a batch only as runtime edits with one schedule (where); baked "
                           "settings and different schedules are generated apart")
        alpha = torch.tensor([settings[j]["alpha"] for j in row_setting.tolist()], dtype=torch.float64)
        return self.apply(model, alpha=alpha, where=settings[0]["where"], bake=False, strict=strict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{s}": d for s, d in self.deltas.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> ITI:
        return cls({k.removeprefix("delta."): v for k, v in tensors.items() if k.startswith("delta.")}, meta)


@contextmanager
def bake_shifts(model: Model, shifts: dict[str, torch.Tensor]):
    """Add ``W_o @ delta`` to the bias of each ``attn.heads`` site's output projection (``delta``:
    ``[H, d_head]``) while the block runs; a missing bias is created and removed again, an existing one
    is restored bit for bit, also on errors."""
    saved = []
    try:
        for s, d in shifts.items():
            site = model.site(s)
            mod, where = site.module, site.where
            if site.kind != "attn.heads" or where != "in":
                raise ITIError(f"cannot bake a shift at {s!r}: only attn.heads sites feed an output projection")
            w = mod.weight
            flat = d.reshape(-1).to(device=w.device, dtype=torch.float64)
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
            shift = (w.double() @ flat) if isinstance(mod, torch.nn.Linear) else (flat @ w.double())
            old = None if mod.bias is None else mod.bias.detach().clone()
            saved.append((mod, old))
            with torch.no_grad():
                if old is None:
                    mod.bias = torch.nn.Parameter(shift.to(w.dtype), requires_grad=False)
                else:
                    mod.bias.add_(shift.to(old.dtype))
        yield
    finally:
        with torch.no_grad():
            for mod, old in reversed(saved):
                if old is None:
                    mod.bias = None
                else:
                    mod.bias.copy_(old)
