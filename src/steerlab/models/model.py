"""The `Model` handle: a HF causal LM, its tokenizer, its adapter and its provenance."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import EmptyInputError, ShapeError
from ..validate import check_text
from .adapters import Arch, Site, arch_for, get_module
from .site import UPPER, BoundSite
from .unembed import Unembed


class Model:
    """A loaded causal LM. ``hf`` is the unmodified transformers model, ``tok`` its tokenizer.

    ``fingerprint`` identifies the weights (a hash of the weight files, or, for in-memory models,
    of the parameters, computed on first use), ``source`` says where they came from. Build one
    with :func:`steerlab.load` or wrap a model you already have with :meth:`Model.wrap`.

    The model owns its forward: :meth:`encode` and :meth:`pad` build left-padded batches,
    :meth:`batches` groups rows of similar length, and :meth:`forward` runs the HF model with
    position ids counted from each row's first real token, ``use_cache=False`` and, when asked,
    ``logits_to_keep``. The caller's tokenizer is never modified: padding is steerlab's own
    (``pad_id``: the tokenizer's pad token, else its end-of-sequence token).
    """

    def __init__(self, hf: nn.Module, tok, name: str = "model", source: str = "", fingerprint: str = ""):
        self.hf, self.tok, self.name, self.source = hf, tok, name, source
        self._fingerprint = fingerprint
        self.arch: Arch = arch_for(hf)
        self._accepts: dict[str, bool] = {}
        self._unembed: Unembed | None = None
        hf.eval()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id: int = int(pad) if pad is not None else 0

    def __repr__(self) -> str:
        return f"Model({self.name!r}, source={self.source!r})"

    @classmethod
    def wrap(cls, hf: nn.Module, tok, name: str | None = None) -> Model:
        """Wrap an already-loaded transformers model and tokenizer (neither is modified)."""
        return cls(hf, tok, name=name or getattr(hf.config, "_name_or_path", "") or "model", source="memory")

    @property
    def fingerprint(self) -> str:
        """Identity of the weights; for in-memory models a hash of the parameters on first use."""
        if not self._fingerprint:
            self._fingerprint = parameter_fingerprint(self.hf)
        return self._fingerprint

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
        return self.unembed.weight.shape[0]

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
    def unembed(self) -> Unembed:
        """The readout: final norm, unembedding ``U`` and soft-cap; the logit lens and the direct logit
        effect of a vector (:class:`steerlab.models.unembed.Unembed`)."""
        if self._unembed is None:
            self._unembed = Unembed(self)
        return self._unembed

    @property
    def final_norm(self) -> nn.Module:
        return self.unembed.norm

    @property
    def unembed_module(self) -> nn.Module:
        return self.unembed.module

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding matrix U, ``[vocab, d_model]`` (``model.unembed.weight``)."""
        return self.unembed.weight

    @property
    def stack(self) -> nn.Module:
        """The decoder stack: the module whose ``forward`` takes the input ids and runs the blocks."""
        return get_module(self.hf, self.arch.layers.rsplit(".", 1)[0])

    def site(self, name: str | Site | BoundSite) -> BoundSite:
        """A canonical site name parsed, validated and bound to this model (:class:`BoundSite`: its
        module, input or output, shape; ``capture`` / ``edit`` / ``record``). Negative layers count
        from the end; a site of another model is bound again by name."""
        if isinstance(name, BoundSite):
            if name.model is self:
                return name
            name = name.name
        s = name if isinstance(name, Site) else Site.parse(name, self.n_layers, self.name)
        return BoundSite(self, s)  # a SiteError when the module is missing

    def site_shape(self, name: str | Site | BoundSite) -> tuple[int, ...]:
        """Feature shape of a site's activation at one position (``model.site(name).shape``)."""
        return self.site(name).shape

    def tied(self) -> bool:
        return self.unembed.weight.data_ptr() == self.hf.get_input_embeddings().weight.data_ptr()

    def untie_unembedding(self) -> None:
        """Give ``lm_head`` its own copy of the weights when it shares them with the input embedding,
        so that editing U (EigenShift) leaves the input embeddings unchanged."""
        if not self.tied():
            return
        head = self.unembed.module
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
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            raise EmptyInputError(f"text {empty[0]} is empty ({len(empty)} empty text(s)): every text needs "
                                  f"at least one character")
        for i, t in enumerate(texts):
            check_text(t, f"text {i}")
        rows = self.tok(texts, add_special_tokens=not chat, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        ids, mask = self.pad(rows)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}

    def generate(self, prompts: str | Sequence, max_new_tokens: int = 20, chat: bool = False,
                 sampling: str = "greedy", k: int = 1, seed: int = 0, batch_size: int = 16,
                 progress: bool | None = None):
        """Continue ``prompts`` (a string, a list of strings, or with ``chat=True`` also dialogues)
        and return a :class:`steerlab.generation.Generation`: ``.texts`` (decoded continuations, ``k``
        per prompt, prompt order) and ``.tokens`` (their new token ids); ``.text`` when there is one.
        The defaults are ``steerlab generate``'s: 20 new tokens, greedy decoding, raw completion (no
        chat template), one sample. ``sampling``: ``greedy``, ``t0.7`` or ``t1.0``; sampled rows draw
        their random numbers from ``(seed, prompt, sample)``, so a steered and an unsteered call see
        the same ones. Any active :func:`steerlab.edit` or intervention applies."""
        # the decoding loop is steerlab.generation's, a layer above this one: it registers itself in
        # models.site.UPPER, which imports it by name on first use (this layer imports none of it)
        generate_text = UPPER["generation"]["generate_text"]
        return generate_text(self, prompts, max_new_tokens=max_new_tokens, chat=chat, sampling=sampling, k=k,
                             seed=seed, batch_size=batch_size, progress=progress)

    # --- forward -----------------------------------------------------------------------------
    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token id lists into ``input_ids`` and ``attention_mask`` on the model's device."""
        if not rows:
            raise EmptyInputError("no token sequences to pad")
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
                mask[i, T - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def accepts(self, arg: str) -> bool:
        """Whether the HF model's ``forward`` takes keyword ``arg`` (remembered on steerlab's side)."""
        if arg not in self._accepts:
            self._accepts[arg] = arg in inspect.signature(self.hf.forward).parameters
        return self._accepts[arg]

    def batches(self, mask: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, slice]]:
        """Row indices in batches of similar length (sorted by real tokens, stable), each with the
        column slice that drops the columns that are padding in every row of the batch."""
        if batch_size < 1:
            raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
        for rows in torch.argsort(mask.sum(1), stable=True).split(batch_size):
            real = mask[rows].any(0).nonzero()
            yield rows, slice(int(real[0, 0]) if len(real) else mask.shape[1] - 1, None)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, logits_to_keep: int | None = None):
        """One forward of a left-padded batch (no KV cache), position ids from the mask. With
        ``logits_to_keep=k`` only the last ``k`` positions' logits are computed where the model
        supports it (``0``: as few as the model allows, for reading activations)."""
        kw: dict = {"use_cache": False}
        if self.accepts("position_ids"):
            kw["position_ids"] = position_ids(mask)
        if logits_to_keep is not None and self.accepts("logits_to_keep"):
            kw["logits_to_keep"] = max(1, logits_to_keep)
        return self.hf(input_ids=ids, attention_mask=mask, **kw)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (as `generate` does)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def cache_of(out):
    """The KV cache of a forward's output (``cache`` in recent transformers, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def cache_rows(cache, index: torch.Tensor):
    """A copy of a KV cache holding the batch rows ``index`` (repeats allowed: ``[0] * B`` gives B copies of
    row 0); the cache itself is left as it is, for the next selection."""
    import copy

    c = copy.deepcopy(cache)
    c.batch_select_indices(index)
    return c


def parameter_fingerprint(model: nn.Module) -> str:
    """A hash of all parameters' bytes (for in-memory models with no weight files)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
