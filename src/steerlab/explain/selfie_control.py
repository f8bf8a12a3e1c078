"""SelfIE supervised control (METHODS.md s4): edit one block's MLP so that a hidden state moves
toward a target.

The state at (hidden-state layer ``L``, token ``t``) of a source prompt is the output of block
``L - 1``; the edit is an additive ``delta`` on that block's MLP down projection (the last
weight the state passes through inside the block), learned with Adam (lr 3e-4, 15 steps by
default) on ``||h(L, t) - target||^2 / d``, plus, optionally, ``preserve_weight`` times the mean
squared change of the same layer's states over reference texts (keep everything else as it was).

The result is the ``selfie-control`` intervention: ``apply()`` swaps ``W + alpha * delta`` into the
module and restores the original weights bit for bit on exit (also on errors); the file stores
only ``delta`` (safetensors) and the header.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from ..hooks import capture
from ..interventions import Intervention, InterventionError, provenance, register
from ..models.adapters import get_module
from ..models.model import Model, position_ids
from ..options import option
from .selfie import SelfieError, layer_index, layer_site, read_states


class ControlError(SelfieError, InterventionError):
    """A supervised-control edit that cannot be fitted or does not fit the model."""


class _Reached(Exception):
    """Raised from the hook on the edited block to end the forward there."""


def down_projection(model: Model, layer: int) -> tuple[str, torch.nn.Parameter]:
    """Name (in ``model.hf``) and weight of the MLP down projection of block ``L - 1``."""
    L = layer_index(model, layer)
    if L == 0:
        raise ControlError("layer 0 is the embeddings: no MLP comes before it; control a layer >= 1 "
                           "(the output of block L-1)")
    w = get_module(model.layer(L - 1), model.arch.mlp_down).weight
    return _param_name(model, w), w


def _param_name(model: Model, w: torch.Tensor) -> str:
    for n, p in model.hf.named_parameters():
        if p is w:
            return n
    raise ControlError("the MLP down projection's weight is not a parameter of the model")


def block_output(model: Model, layer: int, ids: torch.Tensor, mask: torch.Tensor,
                 weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The output of block ``L - 1`` ``[B, T, d]`` for a left-padded batch, with ``weights``
    (name -> tensor) in place of the model's own (differentiable through them); the forward
    stops after that block."""
    L = layer_index(model, layer)
    got: list[torch.Tensor] = []

    def hook(mod, args, out):
        got.append(out[0] if isinstance(out, tuple) else out)
        raise _Reached

    kw = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if model.accepts("position_ids"):
        kw["position_ids"] = position_ids(mask)
    h = model.layer(L - 1).register_forward_hook(hook)
    try:
        functional_call(model.hf, weights or {}, (), kw, strict=False)
    except _Reached:
        pass
    finally:
        h.remove()
    return got[0]


def _target(model: Model, target, layer: int, chat: bool) -> torch.Tensor:
    if isinstance(target, str):
        return read_states(model, target, [(layer, -1)], chat=chat).vectors[0]
    t = torch.as_tensor(target).detach().float()
    if t.shape != (model.d_model,):
        raise ControlError(f"target must be a state of size d_model={model.d_model} (or a text), got shape "
                           f"{tuple(t.shape)}")
    return t.to(model.device)


@dataclass
class SelfieControlFitOptions:
    prompt: str = option("", "source prompt whose hidden state is moved (required)")
    layer: int = option(None, "hidden-state layer (1..n_layers = output of block L-1, negative from the end); the "
                        "MLP down projection of block L-1 is edited (required)", type=int)
    target: str = option("", "target text: its last-token state at the same layer is where the source state is "
                         "moved (required)")
    token: int = option(-1, "token of the source prompt whose state is moved (negative from the end)")
    preserve: list = option([], "reference text whose states at the layer should stay (repeatable)", type=list,
                            repeated=True)
    preserve_file: list = option([], "file of reference texts (.txt/.jsonl/.csv; repeatable)", type=list,
                                 repeated=True)
    preserve_weight: float = option(1.0, "weight of the preservation term (mean squared change of the reference "
                                    "states)", low=0.0)
    steps: int = option(15, "Adam steps", low=1)
    lr: float = option(3e-4, "Adam learning rate", low=0.0)
    chat: bool = option(False, "render the prompt, target and references as user turns with the chat template")

    def references(self) -> list[str]:
        """Each ``preserve`` text, then every text of each ``preserve_file``; raises on empty input."""
        from ..data import load_prompts

        refs = list(self.preserve) + [p.text for f in self.preserve_file for p in load_prompts(f)]
        for what, v in (("prompt", self.prompt), ("target", self.target)):
            if not v:
                raise ControlError(f"--{what} is empty: selfie-control needs a source prompt and a target text")
        if self.layer is None:
            raise ControlError("--layer is required: the hidden-state layer whose state is moved")
        if any(not t for t in refs):
            raise ControlError("a --preserve text is empty")
        return refs


@dataclass
class SelfieControlApplyOptions:
    alpha: float = option(1.0, "multiple of the learned weight delta swapped in", unit="x delta")


@register
@dataclass
class SelfieControl(Intervention):
    """SelfIE supervised control: a learned edit of one block's MLP that moves a hidden state to a target."""

    delta: torch.Tensor
    meta: dict = field(default_factory=dict)
    method = "selfie-control"
    FitOptions = SelfieControlFitOptions
    ApplyOptions = SelfieControlApplyOptions
    strength_option = "alpha"

    @classmethod
    def from_options(cls, model: Model, o: SelfieControlFitOptions) -> SelfieControl:
        refs = o.references()
        iv = cls.fit(model, o.prompt, layer=o.layer, token=o.token, target=o.target, steps=o.steps, lr=o.lr,
                     preserve=refs or None, preserve_weight=o.preserve_weight, chat=o.chat)
        iv.meta["n_references"] = len(refs)
        return iv

    def fit_summary(self) -> list[str]:
        d0, d1, n = self.meta["distance_before"], self.meta["distance_after"], self.meta.get("n_references", 0)
        return [f"distance to the target at layer {self.meta['layer']}, token {self.meta['token']}: {d0:.4g} -> "
                f"{d1:.4g} ({100 * (d1 - d0) / max(d0, 1e-12):+.1f} %)"
                + (f", {n} reference text(s) preserved" if n else "")]

    def __post_init__(self):
        self.delta = torch.as_tensor(self.delta).detach().float().cpu()
        if "layer" not in self.meta:
            raise ControlError("a selfie-control edit needs meta['layer'] (the hidden-state layer it controls)")
        L = int(self.meta["layer"])
        self.meta = {**self.meta, "sites": [f"blocks.{L - 1}.mlp.out"]}

    @classmethod
    def fit(cls, model: Model, data: str, *, layer: int, token: int = -1, target, steps: int = 15,
            lr: float = 3e-4, preserve: Sequence[str] | None = None, preserve_weight: float = 1.0,
            chat: bool = False) -> SelfieControl:
        """Learn ``delta`` so the state at (``layer``, ``token``) of the source prompt ``data`` moves
        to ``target`` (a ``[d_model]`` state, or a text whose last-token state at ``layer`` is taken)."""
        if not isinstance(data, str) or not data:
            raise ControlError("selfie-control is fitted on one source prompt (a non-empty string)")
        if steps < 1 or lr <= 0:
            raise ControlError(f"steps must be >= 1 and lr > 0 (got {steps}, {lr})")
        L = layer_index(model, layer)
        name, w = down_projection(model, L)
        t = read_states(model, data, [(L, token)], chat=chat).pairs[0][1]
        goal = _target(model, target, L, chat)
        src = model.encode([data], chat=chat)
        ref = model.encode(list(preserve), chat=chat) if preserve else None
        ref_before = capture(model, ref, layer_site(model, L), "all")[layer_site(model, L)] if ref else None
        delta = torch.zeros_like(w, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)

        def loss_fn():
            weights = {name: w.detach() + delta.to(w.dtype)}
            h = block_output(model, L, src["input_ids"], src["attention_mask"], weights)[0, t].float()
            loss = ((h - goal) ** 2).mean()
            if ref is not None:
                keep = ref["attention_mask"].bool()
                hr = block_output(model, L, ref["input_ids"], ref["attention_mask"], weights).float()
                loss = loss + preserve_weight * ((hr - ref_before)[keep] ** 2).mean()
            return loss, (h - goal).norm()

        history = []
        with torch.enable_grad():
            for _ in range(steps):
                loss, dist = loss_fn()
                history.append(float(dist.detach()))
                (delta.grad,) = torch.autograd.grad(loss, [delta])
                opt.step()
        with torch.no_grad():
            history.append(float(loss_fn()[1]))
        meta = provenance(model, None, {"layer": L, "token": t, "steps": steps, "lr": lr}, layer=L, token=t,
                          module=name, steps=steps, lr=lr, source=data, chat=chat, n_preserve=len(preserve or []),
                          preserve_weight=preserve_weight, distance_before=history[0], distance_after=history[-1])
        return cls(delta.detach(), meta)

    def check(self, model: Model, strict: bool = True) -> None:
        """Raise when the edit does not fit ``model``: the weight's shape always, the fingerprint when ``strict``."""
        _, w = down_projection(model, int(self.meta["layer"]))
        if tuple(w.shape) != tuple(self.delta.shape):
            raise ControlError(f"the edit's delta has shape {tuple(self.delta.shape)} but {model.name}'s weight "
                               f"{self.meta.get('module')} has {tuple(w.shape)}: fitted on another model")
        super().check(model, strict)

    @contextmanager
    def apply(self, model: Model, *, alpha, strict: bool = True):
        """Swap ``W + alpha * delta`` in while the block runs; the original weights come back bit for bit."""
        self.check(model, strict)
        _, w = down_projection(model, int(self.meta["layer"]))
        original = w.detach().clone()
        with torch.no_grad():
            w.copy_(original + float(alpha) * self.delta.to(device=w.device, dtype=w.dtype))
        try:
            yield self
        finally:
            with torch.no_grad():
                w.copy_(original)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> SelfieControl:
        if "delta" not in tensors:
            raise ControlError(f"a selfie-control file holds a 'delta' tensor; found {', '.join(tensors) or 'none'}")
        return cls(tensors["delta"], meta)
