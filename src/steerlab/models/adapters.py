"""Architecture adapters: the canonical site names mapped onto the real modules of a HF model.

Canonical sites (the same on every architecture):

``embed``                    output of the token embedding module (scaled, for Gemma)
``blocks.{l}.resid_pre``     input of decoder block ``l``
``blocks.{l}.resid_post``    output of decoder block ``l``
``blocks.{l}.attn.heads``    input of the attention output projection, viewed as ``[n_heads, d_head]``
``blocks.{l}.attn.out``      what the attention sub-layer adds to the residual stream
``blocks.{l}.mlp.gate``      output of the MLP gate projection (gated MLPs only)
``blocks.{l}.mlp.up``        output of the MLP up projection (Phi-3: the fused gate_up_proj, 2 d_mlp wide)
``blocks.{l}.mlp.act``       input of the MLP down projection (the neurons)
``blocks.{l}.mlp.down``      output of the MLP down projection (before any post-MLP norm)
``blocks.{l}.mlp.out``       what the MLP sub-layer adds to the residual stream
``final``                    output of the final norm = input of the unembedding
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..errors import SiteError


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture family. Paths inside a block are relative to the block."""

    name: str
    embed: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    attn_o: str
    mlp: str
    mlp_down: str
    mlp_up: str = ""
    mlp_gate: str | None = None
    # modules whose *output* is the sub-layer's contribution to the residual, when it is not the
    # sub-layer's own output (Gemma 2/3 and OLMo 2 norm the attention and MLP outputs before adding them)
    attn_out: str | None = None
    mlp_out: str | None = None


_LLAMA = Arch("llama", "model.embed_tokens", "model.layers", "model.norm", "lm_head",
              "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj")
_PHI3 = Arch("phi3", "model.embed_tokens", "model.layers", "model.norm", "lm_head",
             "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "mlp.gate_up_proj")
_POSTNORM = Arch("postnorm", "model.embed_tokens", "model.layers", "model.norm", "lm_head",
               "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "mlp.up_proj", "mlp.gate_proj",
               attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm")
_GPT2 = Arch("gpt2", "transformer.wte", "transformer.h", "transformer.ln_f", "lm_head",
             "attn", "attn.c_proj", "mlp", "mlp.c_proj", "mlp.c_fc")
_NEOX = Arch("gpt_neox", "gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head",
             "attention", "attention.dense", "mlp", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "phi3": _PHI3,
    "gemma2": _POSTNORM, "gemma3_text": _POSTNORM, "olmo2": _POSTNORM,
    "gpt2": _GPT2, "gpt_neox": _NEOX,
}

SITE_KINDS = ("resid_pre", "attn.heads", "attn.out", "mlp.gate", "mlp.up", "mlp.act", "mlp.down", "mlp.out",
              "resid_post")
_SITE_RE = re.compile(r"^blocks\.(-?\d+)\.(resid_pre|resid_post|attn\.heads|attn\.out|mlp\.gate|mlp\.up|mlp\.act|"
                      r"mlp\.down|mlp\.out)$")
MLP_EXPERT_KINDS = ("mlp.gate", "mlp.up", "mlp.down")
"""Site kinds of the MLP projections' outputs (AurA's experts, as apple/ml-aura hooks them)."""


def arch_for(model: nn.Module) -> Arch:
    """The adapter of a HF causal LM, from its ``config.model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise SiteError(
            f"architecture {mt!r} has no steerlab adapter; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[mt]


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site. ``order`` sorts sites by when the forward pass reaches them."""

    order: tuple[int, int]
    name: str
    kind: str
    layer: int | None

    @staticmethod
    def parse(name: str, n_layers: int, model_name: str = "model") -> Site:
        """Parse a canonical site name; negative layer indices count from the end."""
        if not isinstance(name, str):
            raise SiteError(f"a site is a name such as 'blocks.3.resid_post', got {type(name).__name__} {name!r}")
        if name == "embed":
            return Site((-1, 0), name, "embed", None)
        if name == "final":
            return Site((n_layers, 0), name, "final", None)
        m = _SITE_RE.match(name)
        if not m:
            raise SiteError(
                f"unknown site {name!r}; valid sites: 'embed', 'final', or 'blocks.{{l}}.<kind>' with kind in "
                f"{', '.join(SITE_KINDS)}"
            )
        layer = int(m.group(1))
        if not -n_layers <= layer < n_layers:
            raise SiteError(
                f"layer {layer} out of range in site {name!r}: {model_name} has {n_layers} layers "
                f"(valid: {-n_layers}..{n_layers - 1})"
            )
        layer %= n_layers
        kind = m.group(2)
        return Site((layer, SITE_KINDS.index(kind)), f"blocks.{layer}.{kind}", kind, layer)

    def hook_point(self, model: nn.Module, arch: Arch) -> tuple[nn.Module, str]:
        """(module, 'in' | 'out'): where the site's tensor is read or written."""
        if self.kind == "embed":
            return get_module(model, arch.embed), "out"
        if self.kind == "final":
            return get_module(model, arch.final_norm), "out"
        block = get_module(model, arch.layers)[self.layer]
        rel, where = {
            "resid_pre": ("", "in"),
            "resid_post": ("", "out"),
            "attn.heads": (arch.attn_o, "in"),
            "attn.out": (arch.attn_out or arch.attn, "out"),
            "mlp.gate": (arch.mlp_gate, "out"),
            "mlp.up": (arch.mlp_up, "out"),
            "mlp.act": (arch.mlp_down, "in"),
            "mlp.down": (arch.mlp_down, "out"),
            "mlp.out": (arch.mlp_out or arch.mlp, "out"),
        }[self.kind]
        if rel is None:
            raise SiteError(f"site {self.name!r} is missing in this {arch.name} model: its MLP has no separate "
                            f"{self.kind.split('.')[1]} projection")
        try:
            return (get_module(block, rel) if rel else block), where
        except (AttributeError, IndexError) as e:
            raise SiteError(f"site {self.name!r} is missing in this {arch.name} model: no module {rel!r}") from e
