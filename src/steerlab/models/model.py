"""The `Model` handle: a HF causal LM, its tokenizer, its adapter and its provenance."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import EmptyInputError
from .adapters import Arch, Site, arch_for, get_module


@dataclass
class Model:
    """A loaded causal LM. ``hf`` is the unmodified transformers model, ``tok`` its tokenizer.

    ``fingerprint`` identifies the weights (a hash of the weight files, or of the parameters for
    in-memory models), ``source`` says where they came from. Build one with :func:`steerlab.load`
    or wrap a model you already have with :meth:`Model.wrap`.
    """

    hf: nn.Module
    tok: object
    name: str = "model"
    source: str = ""
    fingerprint: str = ""
    arch: Arch = field(init=False)

    def __post_init__(self) -> None:
        self.arch = arch_for(self.hf)
        self.hf.eval()
        tok = self.tok
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if not self.fingerprint:
            self.fingerprint = parameter_fingerprint(self.hf)

    @classmethod
    def wrap(cls, hf: nn.Module, tok, name: str | None = None) -> Model:
        """Wrap an already-loaded transformers model and tokenizer."""
        return cls(hf, tok, name=name or getattr(hf.config, "_name_or_path", "") or "model", source="memory")

    # --- shape facts -------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return len(get_module(self.hf, self.arch.layers))

    @property
    def d_model(self) -> int:
        return self.hf.get_input_embeddings().weight.shape[1]

    @property
    def n_heads(self) -> int:
        c = self.config
        return getattr(c, "num_attention_heads", None) or c.n_head

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_head(self) -> int:
        o = get_module(self.layer(0), self.arch.attn_o)
        d_in = o.weight.shape[0] if type(o).__name__ == "Conv1D" else o.in_features
        return d_in // self.n_heads

    @property
    def d_mlp(self) -> int:
        down = get_module(self.layer(0), self.arch.mlp_down)
        return down.weight.shape[0] if type(down).__name__ == "Conv1D" else down.in_features

    @property
    def vocab_size(self) -> int:
        return self.unembed_module.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tok, "chat_template", None)

    # --- modules -----------------------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        return get_module(self.hf, self.arch.layers)[i]

    @property
    def final_norm(self) -> nn.Module:
        return get_module(self.hf, self.arch.final_norm)

    @property
    def unembed_module(self) -> nn.Module:
        return get_module(self.hf, self.arch.unembed)

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding matrix U, ``[vocab, d_model]``."""
        return self.unembed_module.weight

    def site(self, name: str | Site) -> Site:
        """Parse and validate a canonical site name against this model."""
        if isinstance(name, Site):
            return name
        s = Site.parse(name, self.n_layers, self.name)
        s.hook_point(self.hf, self.arch)  # raises a SiteError when the module is missing
        return s

    def site_shape(self, name: str | Site) -> tuple[int, ...]:
        """Feature shape of a site's activation at one position."""
        s = self.site(name)
        if s.kind == "attn.heads":
            return (self.n_heads, self.d_head)
        if s.kind == "mlp.act":
            return (self.d_mlp,)
        return (self.d_model,)

    def tied(self) -> bool:
        return self.W_U.data_ptr() == self.hf.get_input_embeddings().weight.data_ptr()

    def untie_unembedding(self) -> None:
        """Give ``lm_head`` its own copy of the weights when it shares them with the input embedding,
        so that editing U (EigenShift) leaves the input embeddings unchanged."""
        if not self.tied():
            return
        head = self.unembed_module
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        self.hf.config.tie_word_embeddings = False
        if hasattr(self.hf.config, "get_text_config"):
            self.hf.config.get_text_config().tie_word_embeddings = False

    # --- text --------------------------------------------------------------------------------
    def chat_text(self, user: str | Sequence[dict], system: str | None = None) -> str:
        """Render one user message (or a list of messages) with the chat template, ready for the
        assistant's turn."""
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template; use raw completion mode")
        msgs = [{"role": "user", "content": user}] if isinstance(user, str) else list(user)
        if system is not None:
            msgs = [{"role": "system", "content": system}, *msgs]
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def encode(self, texts: Sequence[str] | Sequence[list[dict]], chat: bool = False,
               max_length: int | None = None) -> dict:
        """Tokenize a batch with left padding: ``input_ids``, ``attention_mask``, ``position_ids``
        on the model's device. ``chat=True`` renders each text as a user turn (or each list of
        messages as a dialogue) with the chat template, ready for the assistant's reply."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise EmptyInputError("no texts given: need at least one")
        if chat:
            texts = [self.chat_text(t) for t in texts]
            special = False
        else:
            special = True
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=special,
                       truncation=max_length is not None, max_length=max_length)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (as `generate` does)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def parameter_fingerprint(model: nn.Module) -> str:
    """A hash of all parameters' bytes (for in-memory models with no weight files)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
