"""SelfIE supervised control (METHODS.md s4): edit one block's MLP so that a hidden state moves
toward a target.

Layers follow the site vocabulary: ``layer = l`` is the state after block ``l``
(``blocks.{l}.resid_post``), and block ``l``'s MLP is edited (``numbering="hf"`` takes the paper's
hidden-state index ``L = l + 1`` instead). As in the SelfIE notebooks, the edit optimises the MLP's
parameters (``params="mlp"``: every parameter of the block's MLP, additive deltas; ``"down"``: the
down projection only) with Adam on ``||h(l, t) - target||^2 / d``, plus, optionally,
``preserve_weight`` times the mean squared change of the same layer's states over reference
texts. The target is a ``[d_model]`` vector, or a text whose state at ``target_layer`` (default: the
same layer; any layer, e.g. a later one as in the notebooks) and ``target_token`` is taken.

The result is the ``selfie-control`` intervention: ``apply()`` swaps ``W + alpha * delta`` into each
edited parameter and restores the original weights bit for bit on exit (also on errors); the file
stores only the deltas (safetensors, ``delta.<parameter name>``; a file with a single ``delta`` is an
older down-projection edit) and the header.
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
from ..registry import choose
from .selfie import SelfieError, layer_index, layer_site, read_states

PARAMS = ("mlp", "down")


class ControlError(SelfieError, InterventionError):
    """A supervised-control edit that cannot be fitted or does not fit the model."""


class _Reached(Exception):
    """Raised from the hook on the edited block to end the forward there."""


def control_block(model: Model, layer: int, numbering: str = "blocks") -> int:
    """The block whose output is the controlled state (and whose MLP is edited)."""
    if numbering == "hf" and isinstance(layer, int) and not isinstance(layer, bool) \
            and layer_index(model, layer, "hf") == 0:
        raise ControlError("layer 0 is the embeddings: no MLP comes before it; control a layer >= 1 "
                           "(the output of block L-1)")
    L = layer_index(model, layer, numbering)
    return L if numbering == "blocks" else L - 1


def mlp_parameters(model: Model, block: int, params: str = "mlp") -> dict[str, torch.nn.Parameter]:
    """Name (in ``model.hf``) -> parameter of block ``block``'s MLP (``"mlp"``: all of them, ``"down"``:
    the down projection's weight)."""
    choose("params", params, PARAMS, ControlError)
    blk = model.layer(block)
    if params == "down":
        wanted = [get_module(blk, model.arch.mlp_down).weight]
    else:
        wanted = [p for p in get_module(blk, model.arch.mlp).parameters()]
    ids = {id(p) for p in wanted}
    out = {n: p for n, p in model.hf.named_parameters() if id(p) in ids}
    if len(out) != len(wanted):
        raise ControlError("the MLP's parameters are not all parameters of the model")
    return out


def down_projection(model: Model, layer: int, numbering: str = "blocks") -> tuple[str, torch.nn.Parameter]:
    """Name and weight of the MLP down projection of the block whose output is ``layer``."""
    ((name, w),) = mlp_parameters(model, control_block(model, layer, numbering), "down").items()
    return name, w


def block_output(model: Model, block: int, ids: torch.Tensor, mask: torch.Tensor,
                 weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The output of block ``block`` ``[B, T, d]`` for a left-padded batch, with ``weights``
    (name -> tensor) in place of the model's own (differentiable through them); the forward
    stops after that block."""
    got: list[torch.Tensor] = []

    def hook(mod, args, out):
        got.append(out[0] if isinstance(out, tuple) else out)
        raise _Reached

    kw = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if model.accepts("position_ids"):
        kw["position_ids"] = position_ids(mask)
    h = model.layer(block).register_forward_hook(hook)
    try:
        functional_call(model.hf, weights or {}, (), kw, strict=False)
    except _Reached:
        pass
    finally:
        h.remove()
    return got[0]


def target_state(model: Model, target, *, layer: int, numbering: str = "blocks", token: int = -1,
                 chat: bool = False) -> torch.Tensor:
    """A ``[d_model]`` target: the vector given, or the state of a text at (``layer``, ``token``)."""
    if isinstance(target, str):
        if not target:
            raise ControlError("the target text is empty")
        return read_states(model, target, [(layer, token)], chat=chat, numbering=numbering).vectors[0]
    t = torch.as_tensor(target).detach().float()
    if t.shape != (model.d_model,):
        raise ControlError(f"target must be a state of size d_model={model.d_model} (or a text), got shape "
                           f"{tuple(t.shape)}")
    return t.to(model.device)


def _optimise(model, block, weights, src, t, goal, ref, ref_before, preserve_weight, steps, lr):
    """Adam on the deltas of ``weights``; returns the deltas and the distance before each step and at the end."""
    deltas = {n: torch.zeros_like(w, dtype=torch.float32, requires_grad=True) for n, w in weights.items()}
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)

    def loss_fn():
        current = {n: w.detach() + deltas[n].to(w.dtype) for n, w in weights.items()}
        h = block_output(model, block, src["input_ids"], src["attention_mask"], current)[0, t].float()
        loss = ((h - goal) ** 2).mean()
        if ref is not None:
            keep = ref["attention_mask"].bool()
            hr = block_output(model, block, ref["input_ids"], ref["attention_mask"], current).float()
            loss = loss + preserve_weight * ((hr - ref_before)[keep] ** 2).mean()
        return loss, (h - goal).norm()

    history = []
    with torch.enable_grad():
        for _ in range(steps):
            loss, dist = loss_fn()
            history.append(float(dist.detach()))
            grads = torch.autograd.grad(loss, list(deltas.values()))
            for d, g in zip(deltas.values(), grads):
                d.grad = g
            opt.step()
    with torch.no_grad():
        history.append(float(loss_fn()[1]))
    return {n: d.detach() for n, d in deltas.items()}, history


def read_vector(path: str) -> torch.Tensor:
    """One vector from a .safetensors (a single tensor), .pt or .npy file."""
    from pathlib import Path

    import numpy as np

    if not Path(path).is_file():
        raise ControlError(f"target vector file {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(path)
        if len(tensors) != 1:
            raise ControlError(f"{path} holds {len(tensors)} tensors; a target vector file holds one")
        v = next(iter(tensors.values()))
    elif path.endswith(".npy"):
        v = torch.from_numpy(np.load(path))
    else:
        v = torch.load(path, map_location="cpu", weights_only=True)
    return torch.as_tensor(v).float().reshape(-1)


@dataclass
class SelfieControlFitOptions:
    prompt: str = option("", "source prompt whose hidden state is moved (required)")
    layer: int = option(None, "layer l: the state after block l (blocks.l.resid_post) is moved and block l's MLP "
                        "is edited (negative from the end; required)", type=int)
    hf_layer: bool = option(False, "read layer and target_layer in the SelfIE paper's numbering (L = output of "
                            "block L-1; block L-1's MLP is edited)")
    target: str = option("", "target text: its state at target_layer (default: layer), token target_token, is "
                         "where the source state is moved (this or target_vector)")
    target_vector: str = option("", "target vector instead of a text: a .safetensors (one tensor), .pt or .npy "
                                "file holding d_model numbers")
    target_layer: int = option(None, "layer the target text's state is read at (the notebooks move a later "
                               "layer's state into an earlier one)", type=int)
    target_token: int = option(-1, "token of the target text (negative from the end)")
    token: int = option(-1, "token of the source prompt whose state is moved (negative from the end)")
    params: str = option("mlp", "mlp: every parameter of the block's MLP (as the SelfIE notebooks) | down: its "
                         "down projection only", choices=PARAMS)
    preserve: list = option([], "reference text whose states at the layer should stay (repeatable)", type=list,
                            repeated=True)
    preserve_file: list = option([], "file of reference texts (.txt/.jsonl/.csv; repeatable)", type=list,
                                 repeated=True)
    preserve_weight: float = option(1.0, "weight of the preservation term (mean squared change of the reference "
                                    "states)", low=0.0)
    steps: int = option(50, "Adam steps", low=1)
    lr: float = option(1e-3, "Adam learning rate", low=0.0)
    chat: bool = option(False, "render the prompt, target and references as user turns with the chat template")

    def references(self) -> list[str]:
        """Each ``preserve`` text, then every text of each ``preserve_file``; raises on empty input."""
        from ..data import load_prompts

        refs = list(self.preserve) + [p.text for f in self.preserve_file for p in load_prompts(f)]
        if not self.prompt:
            raise ControlError("--prompt is empty: give the source prompt whose state is moved")
        if bool(self.target) == bool(self.target_vector):
            raise ControlError("give exactly one of --target (a text whose state is the target) and "
                               "--target-vector (a file holding one d_model vector)")
        if self.layer is None:
            raise ControlError("--layer is required: the layer whose state is moved")
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

    deltas: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    method = "selfie-control"
    FitOptions = SelfieControlFitOptions
    ApplyOptions = SelfieControlApplyOptions
    strength_option = "alpha"

    @classmethod
    def from_options(cls, model: Model, o: SelfieControlFitOptions) -> SelfieControl:
        refs = o.references()
        goal = read_vector(o.target_vector) if o.target_vector else o.target
        return cls.fit(model, o.prompt, layer=o.layer, token=o.token, target=goal, steps=o.steps, lr=o.lr,
                       preserve=refs or None, preserve_weight=o.preserve_weight, chat=o.chat,
                       numbering="hf" if o.hf_layer else "blocks", params=o.params, target_layer=o.target_layer,
                       target_token=o.target_token)

    def fit_summary(self) -> list[str]:
        d0, d1, b = self.meta["distance_before"], self.meta["distance_after"], self.meta["block"]
        n = self.meta.get("n_preserve", 0)
        hf = self.meta.get("layer_numbering") == "hf"
        return [f"distance to the target after block {b} (blocks.{b}.resid_post"
                + (f", the paper's layer {b + 1}" if hf else "") + f"), token {self.meta['token']}: "
                f"{d0:.4g} -> {d1:.4g} ({100 * (d1 - d0) / max(d0, 1e-12):+.1f} %, "
                f"{100 * self.meta['moved']:.0f}% of the way) after {self.meta['steps']} steps, "
                f"{self.meta['params']} parameters" + (f", {n} reference text(s) preserved" if n else "")]

    def __post_init__(self):
        if isinstance(self.deltas, torch.Tensor):  # a down-projection delta (older files)
            self.deltas = {str(self.meta.get("module", "")): self.deltas}
        self.deltas = {n: torch.as_tensor(d).detach().float().cpu() for n, d in self.deltas.items()}
        if "block" not in self.meta and "layer" not in self.meta:
            raise ControlError("a selfie-control edit needs meta['block'] (the block whose MLP it edits)")
        b = int(self.meta["block"]) if "block" in self.meta else int(self.meta["layer"]) - 1
        self.meta = {**self.meta, "block": b, "sites": [f"blocks.{b}.mlp.out"]}

    @property
    def delta(self) -> torch.Tensor:
        """The single delta of a down-projection edit."""
        if len(self.deltas) != 1:
            raise ControlError(f"this edit changes {len(self.deltas)} parameters; read .deltas")
        return next(iter(self.deltas.values()))

    @classmethod
    def fit(cls, model: Model, data: str, *, layer: int, token: int = -1, target, steps: int = 50,
            lr: float = 1e-3, preserve: Sequence[str] | None = None, preserve_weight: float = 1.0,
            chat: bool = False, numbering: str = "blocks", params: str = "mlp", target_layer: int | None = None,
            target_token: int = -1) -> SelfieControl:
        """Learn deltas so the state at (``layer``, ``token``) of the source prompt ``data`` moves to
        ``target`` (a ``[d_model]`` vector, or a text whose state at (``target_layer``, default
        ``layer``; ``target_token``) is taken). ``numbering``: ``"blocks"`` (l = after block l) or
        ``"hf"`` (the paper's: L = after block L-1)."""
        if not isinstance(data, str) or not data:
            raise ControlError("selfie-control is fitted on one source prompt (a non-empty string)")
        if steps < 1 or lr <= 0:
            raise ControlError(f"steps must be >= 1 and lr > 0 (got {steps}, {lr})")
        b = control_block(model, layer, numbering)
        weights = mlp_parameters(model, b, params)
        t = read_states(model, data, [(b, token)], chat=chat, numbering="blocks").pairs[0][1]
        tl = layer if target_layer is None else target_layer
        goal = target_state(model, target, layer=tl, numbering=numbering, token=target_token, chat=chat)
        src = model.encode([data], chat=chat)
        ref = model.encode(list(preserve), chat=chat) if preserve else None
        site = layer_site(model, b, "blocks")
        ref_before = capture(model, ref, site, "all")[site] if ref else None
        deltas, history = _optimise(model, b, weights, src, t, goal, ref, ref_before, preserve_weight, steps, lr)
        meta = provenance(model, None, {"block": b, "token": t, "params": params, "steps": steps, "lr": lr},
                          block=b, layer=b + 1, token=t, params=params, modules=list(weights), steps=steps, lr=lr,
                          source=data, chat=chat, target=target if isinstance(target, str) else "vector",
                          target_layer=None if not isinstance(target, str) else tl, layer_numbering=numbering,
                          n_preserve=len(preserve or []), preserve_weight=preserve_weight,
                          distance_before=history[0], distance_after=history[-1],
                          moved=1.0 - history[-1] / max(history[0], 1e-12))
        return cls(deltas, meta)

    def _weights(self, model: Model) -> dict[str, torch.nn.Parameter]:
        named = dict(model.hf.named_parameters())
        missing = [n for n in self.deltas if n not in named]
        if missing:
            raise ControlError(f"{model.name} has no parameter {missing[0]!r}: this edit was fitted on another model")
        return {n: named[n] for n in self.deltas}

    def check(self, model: Model, strict: bool = True) -> None:
        """Raise when the edit does not fit ``model``: the weights' shapes always, the fingerprint when ``strict``."""
        for n, w in self._weights(model).items():
            if tuple(w.shape) != tuple(self.deltas[n].shape):
                raise ControlError(f"the edit's delta has shape {tuple(self.deltas[n].shape)} but {model.name}'s "
                                   f"weight {n} has {tuple(w.shape)}: fitted on another model")
        super().check(model, strict)

    @contextmanager
    def apply(self, model: Model, *, alpha, strict: bool = True):
        """Swap ``W + alpha * delta`` in while the block runs; the original weights come back bit for bit."""
        self.check(model, strict)
        weights = self._weights(model)
        originals = {n: w.detach().clone() for n, w in weights.items()}
        try:
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(originals[n] + float(alpha) * self.deltas[n].to(device=w.device, dtype=w.dtype))
            yield self
        finally:
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(originals[n])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{n}": d for n, d in self.deltas.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> SelfieControl:
        if "delta" in tensors:  # an older file: one delta on the down projection named in meta['module']
            return cls({str(meta.get("module", "")): tensors["delta"]}, meta)
        deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
        if not deltas:
            raise ControlError(f"a selfie-control file holds 'delta.<parameter>' tensors; found "
                               f"{', '.join(tensors) or 'none'}")
        return cls(deltas, meta)
