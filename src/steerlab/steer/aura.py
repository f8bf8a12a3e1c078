"""AurA: dampen MLP units in proportion to how well they detect toxicity (Suau et al. 2024,
apple/ml-aura; the baseline of EigenShift, METHODS.md section 3).

An "expert" is one output unit of an MLP projection, as the paper's code hooks them
(``experts="projections"``, the default): the outputs of the up, gate and down projections
(``blocks.{l}.mlp.up`` / ``mlp.gate`` / ``mlp.down``; GPT-2: ``c_fc`` and ``c_proj``; GPT-NeoX:
``dense_h_to_4h`` and ``dense_4h_to_h``; Phi-3: the fused ``gate_up_proj`` and ``down_proj``), located
through the adapter table. ``experts="act"`` takes instead the input of the down projection
(``blocks.{l}.mlp.act``, the product of gate and up for a gated MLP: one unit per neuron, steerlab's
earlier default). Its response to a text is its maximum over the text's real tokens
(``capture(..., positions="max")``); its AUROC as a detector of toxic texts against non-toxic ones
is computed for all units at once (:func:`auroc`: the Mann-Whitney rank formula with tied values
given their average rank, vectorised over units). Factors (:func:`aura_factors`):

- ``aura``: ``alpha_j = 1 - 2 (AUROC_j - 0.5)`` where ``AUROC_j > 0.5``, else 1;
- ``damp``: 0.5 for the ``top_n`` units with the highest AUROC (over all layers), 1 elsewhere;
- ``det0``: 0 for those units.

A label-shuffled null (the same AUROCs with the toxic / non-toxic labels permuted, seeded) is
computed at fit time and recorded in the metadata (``null``): how many units the proportional
variant would dampen, and by how much, if the units detected nothing, next to the real numbers.

Applying multiplies each unit's activation by its factor at every position (prompt and generated
tokens) through :func:`steerlab.edit` with :func:`steerlab.scale`, at the layers with any factor
below 1; the hooks are removed on exit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..edits import ScaleRows, scale
from ..errors import SiteError
from ..hooks import capture, edit
from ..interventions import Intervention, InterventionError, contrast_texts, provenance, register, text_ids
from ..models.model import Model
from ..options import option
from ..registry import choose

VARIANTS = ("aura", "damp", "det0")
EXPERTS = ("projections", "act")


class AuraError(InterventionError):
    """Bad AurA settings (variant, top_n), too few toxic or non-toxic texts, or a file that does not fit."""


def auroc(responses: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """AUROC of every column of ``responses [N, U]`` as a score for ``labels [N]`` (True: positive),
    with ties counted half (average ranks): ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``.
    Vectorised over columns, ``chunk`` columns at a time; float64 result on ``responses``' device."""
    y = torch.as_tensor(labels, device=responses.device).bool()
    if responses.dim() != 2 or y.shape != (responses.shape[0],):
        raise AuraError(f"responses must be [N, units] with one label per row; got {tuple(responses.shape)} "
                        f"and {tuple(y.shape)} labels")
    N = responses.shape[0]
    n1 = int(y.sum())
    n0 = N - n1
    if n1 == 0 or n0 == 0:
        raise AuraError(f"AUROC needs positive and negative examples; got {n1} positive and {n0} negative")
    idx = torch.arange(N, device=responses.device)[:, None]
    out = []
    for c in range(0, responses.shape[1], chunk):
        v, order = responses[:, c:c + chunk].float().sort(0)
        same = v[1:] == v[:-1]
        starts = torch.cat([torch.ones_like(v[:1], dtype=torch.bool), ~same])
        ends = torch.cat([~same, torch.ones_like(v[:1], dtype=torch.bool)])
        first = torch.where(starts, idx, 0).cummax(0).values
        last = torch.where(ends, idx, N - 1).flip(0).cummin(0).values.flip(0)
        ranks = (first + last).double() / 2 + 1
        r_pos = (ranks * y[order]).sum(0)
        out.append((r_pos - n1 * (n1 + 1) / 2) / (n1 * n0))
    return torch.cat(out)


def aura_factors(auc: torch.Tensor, variant: str = "aura", top_n: int | None = None) -> torch.Tensor:
    """Per-unit factors from AUROCs (see the module docstring)."""
    choose("AurA variant", variant, VARIANTS, AuraError)
    if variant == "aura":
        return torch.where(auc > 0.5, 1.0 - 2.0 * (auc - 0.5), torch.ones_like(auc))
    if top_n is None or not 1 <= top_n <= auc.numel():
        raise AuraError(f"variant {variant!r} needs top_n between 1 and the number of units ({auc.numel()}), "
                        f"got {top_n}")
    f = torch.ones_like(auc)
    f[auc.topk(top_n).indices] = 0.5 if variant == "damp" else 0.0
    return f


def expert_sites(model: Model, layers: Sequence[int] | None = None, experts: str = "projections") -> list[str]:
    """The sites whose units are experts, per layer: the outputs of the MLP projections the model's
    architecture has (gate, up, down; ``projections``) or the down projection's input (``act``)."""
    choose("AurA experts", experts, EXPERTS, AuraError)
    kinds = ("mlp.gate", "mlp.up", "mlp.down") if experts == "projections" else ("mlp.act",)
    out = []
    for i in range(model.n_layers) if layers is None else layers:
        for k in kinds:
            try:
                out.append(model.site(f"blocks.{i}.{k}").name)
            except SiteError:  # no separate gate projection (GPT-2, GPT-NeoX, Phi-3's fused one)
                continue
    return out


def null_summary(auc: torch.Tensor, null: torch.Tensor) -> dict:
    """The proportional variant's dampening on the real AUROCs against a label-shuffled null:
    units with a factor below 1, their mean factor, and units with AUROC >= 0.7, for each."""
    def side(a):
        f = aura_factors(a, "aura")
        low = f < 1
        return {"units_dampened": int(low.sum()), "mean_factor": round(float(f[low].mean()), 4) if low.any() else 1.0,
                "units_auroc_ge_0.7": int((a >= 0.7).sum())}
    real, shuffled = side(auc), side(null)
    return {"real": real, "shuffled_labels": shuffled,
            "exceeds_noise": real["units_auroc_ge_0.7"] > 2 * max(1, shuffled["units_auroc_ge_0.7"])
            and real["mean_factor"] < shuffled["mean_factor"]}


def _texts(data) -> tuple[list[str], list[str]]:
    """(non-toxic, toxic) texts from a ContrastSet (desirable = non-toxic) or a pair."""
    try:
        return contrast_texts(data, "AurA data (non-toxic texts, toxic texts; or texts_from_generations())")
    except InterventionError as e:
        raise AuraError(str(e)) from None


def texts_from_generations(model: Model, prompts: Sequence, cfg=None, scorer="default",
                           threshold: float = 0.5) -> tuple[list[str], list[str]]:
    """The model's own scored generations as AurA data: each prompt plus one of its continuations,
    labelled toxic when the scorer gives the whole text >= ``threshold``. Returns (non-toxic, toxic)."""
    from ..generation import GenConfig, generate, prompt_ids_texts
    from ..scoring import get_scorer

    cfg = cfg or GenConfig(sampling="t1.0", k=2)
    _, texts = prompt_ids_texts(prompts)
    full = [t + c for t, cs in zip(texts, generate(model, prompts, cfg)) for c in cs]
    tox = get_scorer(scorer).toxicity(full) >= threshold
    return [t for t, x in zip(full, tox) if not x], [t for t, x in zip(full, tox) if x]


@dataclass
class AuraFitOptions:
    variant: str = option("aura", "aura: factor 1 - 2 (AUROC - 0.5) for units with AUROC > 0.5; damp: 0.5 and "
                          "det0: 0 for the top N", choices=VARIANTS)
    top_n: int = option(0, "units dampened by damp / det0 (0: 1% of all MLP units)", low=0, unit="units")
    experts: str = option("projections", "projections: the outputs of the MLP's up, gate and down projections (the "
                          "paper's code); act: the input of the down projection (one unit per neuron)",
                          choices=EXPERTS)
    prompts: str = option("rtp", "prompt set whose training split (seeded 60/20/20) is generated from")
    n_prompts: int = option(200, "training prompts to generate from (0: all)", low=0, unit="prompts")
    samples: int = option(2, "continuations per prompt", low=1)
    max_new_tokens: int = option(20, "new tokens per continuation", low=1, unit="tokens")
    scorer: str = option("default", "scorer labelling prompt + continuation")
    threshold: float = option(0.5, "toxic when the scorer gives >= threshold", low=0.0, high=1.0)
    min_texts: int = option(8, "fewest toxic (and non-toxic) texts accepted", low=1, unit="texts")
    seed: int = option(0, "split and sampling seed")


@dataclass
class AuraApplyOptions:
    variant: str = option(None, "replace the fitted factors by this variant's, recomputed from the saved AUROCs",
                          type=str, choices=VARIANTS)
    top_n: int = option(None, "units dampened by damp / det0 (default: 1% of them)", type=int, low=1,
                        unit="units")


@register
@dataclass
class AurA(Intervention):
    """AurA: scale each MLP unit by a factor that falls with its AUROC as a toxicity detector."""

    factors: dict[str, torch.Tensor]
    aurocs: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    method = "aura"
    FitOptions = AuraFitOptions
    ApplyOptions = AuraApplyOptions

    def __post_init__(self):
        self.factors = {s: torch.as_tensor(f).float().cpu() for s, f in self.factors.items()}
        self.aurocs = {s: torch.as_tensor(a).float().cpu() for s, a in self.aurocs.items()}
        self.meta = {**self.meta, "sites": [s for s, f in self.factors.items() if (f != 1).any()]}

    @classmethod
    def fit(cls, model: Model, data, variant: str = "aura", top_n: int | None = None,
            layers: Sequence[int] | None = None, min_texts: int = 8, batch_size: int = 16,
            experts: str = "projections", seed: int = 0) -> AurA:
        """Fit from ``(non_toxic_texts, toxic_texts)`` (or a ContrastSet, desirable = non-toxic):
        max-pooled responses of every expert (:func:`expert_sites`; all layers by default), their
        AUROCs, and the factors of ``variant`` (``damp``/``det0``: ``top_n`` units, default 1% of them);
        ``seed`` permutes the labels of the null recorded in ``meta["null"]``."""
        non, tox = _texts(data)
        if len(tox) < min_texts or len(non) < min_texts:
            raise AuraError(f"found {len(tox)} toxic and {len(non)} non-toxic texts; AurA needs at least {min_texts} "
                            f"of each: use more prompts (--n-prompts), more samples per prompt (--samples), a "
                            f"toxicity-prone prompt set (rtp) or a lower --threshold")
        choose("AurA variant", variant, VARIANTS, AuraError)
        sites = expert_sites(model, layers, experts)
        caps = capture(model, non + tox, sites, "max", batch_size=batch_size)
        labels = torch.arange(len(non) + len(tox), device=model.device) >= len(non)
        resp = torch.cat([caps[s] for s in sites], 1)
        auc = auroc(resp, labels)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(labels.device)
        null = null_summary(auc, auroc(resp, labels[perm]))
        n = top_n if top_n is not None or variant == "aura" else max(1, math.ceil(0.01 * auc.numel()))
        f = aura_factors(auc, variant, n)
        sizes = [caps[s].shape[1] for s in sites]
        meta = provenance(model, (non, tox), {"variant": variant, "experts": experts,
                                              **({"top_n": n} if variant != "aura" else {})},
                          data_text_ids=text_ids(non, tox),
                          d_mlp=model.d_mlp, n_toxic=len(tox), n_nontoxic=len(non),
                          units_dampened=int((f < 1).sum()), null=null)
        return cls(dict(zip(sites, f.split(sizes))), dict(zip(sites, auc.split(sizes))), meta)

    def check(self, model: Model, strict: bool = True) -> None:
        """Sites and sizes always; the model fingerprint when ``strict``."""
        self.check_sizes(model, self.factors, "AurA factors", AuraError)
        super().check(model, strict)

    def variant_factors(self, variant: str, top_n: int | None = None) -> dict[str, torch.Tensor]:
        """Per-site factors of ``variant`` recomputed from the saved AUROCs (``damp``/``det0``: the
        ``top_n`` units with the highest AUROC over all layers, default 1% of them)."""
        if not self.aurocs:
            raise AuraError("this AurA file has no AUROCs (saved without them), so its variant cannot be changed")
        sites = list(self.aurocs)
        auc = torch.cat([self.aurocs[s] for s in sites])
        n = top_n if top_n is not None or variant == "aura" else max(1, math.ceil(0.01 * auc.numel()))
        f = aura_factors(auc, variant, n)
        return dict(zip(sites, f.split([self.aurocs[s].numel() for s in sites])))

    @classmethod
    def from_options(cls, model: Model, o: AuraFitOptions) -> AurA:
        """``steerlab fit aura``: the model's own scored continuations of training prompts."""
        from ..data import training_prompts
        from ..generation import GenConfig

        cfg = GenConfig(max_new_tokens=o.max_new_tokens, sampling="t1.0", k=o.samples, seed=o.seed)
        data = texts_from_generations(model, training_prompts(o.prompts, o.n_prompts, o.seed), cfg, o.scorer,
                                      o.threshold)
        iv = cls.fit(model, data, variant=o.variant, top_n=o.top_n or None, min_texts=o.min_texts, experts=o.experts,
                     seed=o.seed)
        iv.meta["n_texts"] = {"non_toxic": len(data[0]), "toxic": len(data[1])}
        return iv

    def fit_summary(self) -> list[str]:
        n = self.meta.get("n_texts")
        return ([f"{n['toxic']} toxic and {n['non_toxic']} non-toxic texts"] if n else []) + \
            [f"{self.meta['units_dampened']} units dampened over {len(self.sites)} sites"] + \
            ([f"proportional dampening vs label-shuffled null: {nu['real']['units_auroc_ge_0.7']} units with AUROC "
              f">= 0.7 against {nu['shuffled_labels']['units_auroc_ge_0.7']}; mean factor "
              f"{nu['real']['mean_factor']} against {nu['shuffled_labels']['mean_factor']}"]
             if (nu := self.meta.get("null")) else [])

    @contextmanager
    def apply(self, model: Model, *, variant, top_n, strict: bool = True):
        """Context manager: each unit's activation times its factor, at every position. ``variant``
        (and ``top_n``) replace the fitted factors by that variant's, from the saved AUROCs."""
        self.check(model, strict)
        edits = {s: scale(f) for s, f in self.setting_factors(variant, top_n).items() if (f != 1).any()}
        if not edits:
            yield None
            return
        with edit(model, edits) as step:
            yield step

    def setting_factors(self, variant: str | None, top_n: int | None) -> dict[str, torch.Tensor]:
        """The per-site factors one setting of :meth:`apply`'s options applies."""
        if variant is None and top_n is None:
            return self.factors
        return self.variant_factors(variant or self.meta.get("options", {}).get("variant", "aura"), top_n)

    def grid_groups(self, settings) -> list[list[int]]:
        """Every setting in one group: each is a vector of unit factors (:meth:`apply_rows`)."""
        return [list(range(len(settings)))]

    @contextmanager
    def apply_rows(self, model: Model, settings, row_setting, strict: bool = True):
        """Several settings in one batch: each row's units times its own setting's factors (``[rows,
        units]`` at every site that any setting edits; a factor of 1 leaves a unit exactly as it is)."""
        self.check(model, strict)
        per = [self.setting_factors(o["variant"], o["top_n"]) for o in settings]
        sites = list(dict.fromkeys(s for f in per for s, x in f.items() if (x != 1).any()))
        size = {s: x for f in per for s, x in f.items()}
        edits = {s: ScaleRows(torch.stack([f.get(s, torch.ones_like(size[s])) for f in per])[row_setting])
                 for s in sites}
        if not edits:
            yield None
            return
        with edit(model, edits) as step:
            yield step

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"factor.{s}": f for s, f in self.factors.items()},
                **{f"auroc.{s}": a for s, a in self.aurocs.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> AurA:
        factors = {k[len("factor."):]: v for k, v in tensors.items() if k.startswith("factor.")}
        if not factors:
            raise AuraError(f"AurA file has no factor tensors (has {sorted(tensors)[:4]})")
        return cls(factors, {k[len("auroc."):]: v for k, v in tensors.items() if k.startswith("auroc.")}, meta)
