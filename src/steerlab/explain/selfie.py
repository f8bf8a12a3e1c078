"""SelfIE: the model describes its own hidden states in words (Chen et al. 2024; METHODS.md s4).

To interpret the hidden state ``h`` at (layer ``L``, token ``t``) of an original prompt, run an
*interpretation prompt* that holds placeholder tokens, overwrite the hidden state at every
placeholder position with ``h`` before decoder block ``k`` during the prefill only, and let the
model decode greedily: the text it writes is its description of ``h``.

Conventions (HF indexing of hidden states):

- layer ``L = 0`` is the embeddings (the input of block 0, scaled for Gemma: read at
  ``blocks.0.resid_pre``); ``L >= 1`` is the output of block ``L - 1`` (``blocks.{L-1}.resid_post``).
  ``L = n_layers`` is the last block's raw output (transformers' last ``hidden_states`` entry is
  after the final norm instead). Negative layers count from the end (``-1`` = ``n_layers``).
- "before decoder block ``k``" is the site ``blocks.{k}.resid_pre``: the input of block ``k``, the
  same tensor as ``hidden_states[k]``; ``k`` runs from 0 (overwrite the embeddings) to
  ``n_layers - 1``. The default ``k = 1`` writes the state after block 0.
- Injection modes: ``replace`` writes ``h``; ``add`` adds ``strength * h`` to what is there;
  ``none`` injects nothing (a control: what the interpretation prompt says on its own).
- Hidden states are injected, never embeddings built by hand, so embedding-scaled models (Gemma)
  need nothing special: the interpretation prompt's own embeddings come from the model's module.

Placeholder positions are exact for any tokenizer: the text parts are tokenized separately and
the placeholder token id is inserted between them, so no string search is involved.

Relevancy of interpretation token ``y_t`` is ``|p_with(y_t) - p_without(y_t)|``, teacher-forced
on the interpretation prompt plus the decoded tokens, with and without the injection. ``p_with``
comes from the decoding pass itself (the tokens decoded are the tokens fed: that pass *is* the
teacher-forced forward with the injection); ``p_without`` from one batched forward over the
decoded tokens after the un-injected prompt, whose cache is computed once.

Many states are decoded together: every row runs the same interpretation prompt (no padding) and
one edit writes each row's own state. The tokens before the first placeholder are the same in
every row and untouched by the injection: their KV cache is computed once and shared.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..errors import SteerlabError
from ..hooks import EditFn, capture, edit
from ..models.model import Model
from ..registry import choose
from .lens import token_str

MODES = ("replace", "add", "none")
DEFAULT_CHAT_PARTS: tuple = (5, " Sum up what this means in a few words.")
"""User turn of the default interpretation prompt for chat models (then the assistant's turn)."""
DEFAULT_PLAIN_PARTS: tuple = ('"', 5, '"\nIn a few words, the text above means:')
"""Default interpretation prompt for models without a chat template (raw completion)."""
_MARK = "\ue000"  # a private-use character standing for a placeholder group while rendering


class SelfieError(SteerlabError):
    """A SelfIE input that cannot work: no placeholder, a layer or token out of range, a vector of
    the wrong size, an unknown mode."""


# --- interpretation prompts ------------------------------------------------------------------------
@dataclass(frozen=True)
class InterpretationPrompt:
    """Token ids of an interpretation prompt and the positions of its placeholder tokens."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    parts: tuple = ()
    chat: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, model: Model, show: str = "[X]") -> str:
        """The prompt as text, each placeholder shown as ``show``."""
        ids = list(self.ids)
        pieces, start = [], 0
        for p in (*self.positions, len(ids)):
            pieces.append(model.tok.decode(ids[start:p]))
            start = p + 1
        return show.join(pieces)


def _special_prefix(tok) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS), found by comparison."""
    with_sp = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            return list(with_sp[:i])
    return []


def placeholder_id(model: Model, placeholder: str | int = "_") -> int:
    """The token id of the placeholder (a text that must be exactly one token, or an id)."""
    if isinstance(placeholder, int) and not isinstance(placeholder, bool):
        if not 0 <= placeholder < model.vocab_size:
            raise SelfieError(f"placeholder token id {placeholder} is outside the vocabulary (0..{model.vocab_size - 1})")
        return placeholder
    ids = model.tok(placeholder, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SelfieError(f"placeholder {placeholder!r} is {len(ids)} tokens for {model.name}; it must be exactly one "
                          f"token (try '_' or give a token id)")
    return int(ids[0])


def _pieces(model: Model, parts: Sequence, chat: bool) -> tuple[list[str], list[int]]:
    """Text pieces around the placeholder groups (rendered through the chat template when ``chat``)
    and the size of each group."""
    counts, content = [], []
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, str | int):
            raise SelfieError(f"interpretation prompt parts are strings and ints (placeholder counts); got "
                              f"{type(p).__name__} {p!r}")
        if isinstance(p, int):
            if p < 1:
                raise SelfieError(f"a placeholder count must be >= 1, got {p}")
            counts.append(p)
            content.append(_MARK)
        else:
            content.append(p.replace(_MARK, ""))
    if not counts:
        raise SelfieError(f"interpretation prompt {list(parts)!r} has no placeholder: put an int (the number of "
                          f"placeholder tokens) among the text parts, e.g. [5, ' Sum up what this means.']")
    text = "".join(content)
    if chat:
        text = model.chat_text(text)
    pieces = text.split(_MARK)
    if len(pieces) != len(counts) + 1:
        raise SelfieError(f"the chat template of {model.name} changed the placeholders ({len(pieces) - 1} of "
                          f"{len(counts)} survived); pass chat=False")
    return pieces, counts


def interpretation_prompt(model: Model, parts: Sequence | None = None, *, chat: bool | None = None,
                          placeholder: str | int = "_") -> InterpretationPrompt:
    """Build an interpretation prompt from text parts and placeholder counts (ints).

    ``chat`` (default: whether the model has a chat template) renders the parts as the user's turn
    followed by the assistant's. Default parts: :data:`DEFAULT_CHAT_PARTS` (chat) or
    :data:`DEFAULT_PLAIN_PARTS`. Each text piece is tokenized on its own and the placeholder's
    token id inserted between pieces, so the placeholder positions are exact."""
    chat = bool(model.chat_template) if chat is None else chat
    if chat and not model.chat_template:
        raise SelfieError(f"{model.name} has no chat template; build the interpretation prompt with chat=False")
    parts = tuple(parts) if parts is not None else (DEFAULT_CHAT_PARTS if chat else DEFAULT_PLAIN_PARTS)
    pieces, counts = _pieces(model, parts, chat)
    ph = placeholder_id(model, placeholder)
    tokenized = model.tok(pieces, add_special_tokens=False)["input_ids"]
    ids = [] if chat else _special_prefix(model.tok)
    positions: list[int] = []
    for piece, n in zip(tokenized, [*counts, 0]):
        ids += piece
        positions += range(len(ids), len(ids) + n)
        ids += [ph] * n
    return InterpretationPrompt(tuple(int(i) for i in ids), tuple(positions), parts, chat)


def as_interpretation_prompt(model: Model, prompt) -> InterpretationPrompt:
    """An :class:`InterpretationPrompt` as given, or built from parts (None: the default)."""
    if isinstance(prompt, InterpretationPrompt):
        if not prompt.positions:
            raise SelfieError("interpretation prompt has no placeholder positions")
        if max(prompt.ids) >= model.vocab_size:
            raise SelfieError(f"interpretation prompt holds token ids beyond {model.name}'s vocabulary")
        return prompt
    if isinstance(prompt, str):
        raise SelfieError("an interpretation prompt is a list of text parts and placeholder counts, e.g. "
                          "[5, ' Sum up what this means.'], not a single string (it would have no placeholder)")
    return interpretation_prompt(model, prompt)


# --- reading hidden states -------------------------------------------------------------------------
def layer_index(model: Model, layer: int) -> int:
    """A hidden-state layer in HF indexing (0 = embeddings .. n_layers), negative counted from the end."""
    n = model.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
        raise SelfieError(f"layer {layer!r} is out of range for {model.name}: hidden-state layers are 0..{n} "
                          f"(0 = embeddings, L = output of block L-1), or -{n + 1}..-1 from the end")
    return layer % (n + 1)


def layer_site(model: Model, layer: int) -> str:
    """The site holding hidden-state layer ``L``: ``blocks.0.resid_pre`` for 0, else ``blocks.{L-1}.resid_post``."""
    L = layer_index(model, layer)
    return "blocks.0.resid_pre" if L == 0 else f"blocks.{L - 1}.resid_post"


def injection_site(model: Model, k: int) -> str:
    """The site "before decoder block ``k``": ``blocks.{k}.resid_pre`` (= ``hidden_states[k]``)."""
    n = model.n_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        raise SelfieError(f"injection block k={k!r} is out of range for {model.name}: inject before block 0..{n - 1}")
    return f"blocks.{k}.resid_pre"


@dataclass
class States:
    """Hidden states read from one prompt: ``vectors [N, d]`` (float32, on the model's device) at
    ``pairs`` (normalised ``(layer, token)``), the text of each token, and the prompt's token count."""

    vectors: torch.Tensor
    pairs: list[tuple[int, int]]
    token_texts: list[str]
    n_tokens: int


@torch.no_grad()
def read_states(model: Model, prompt: str, pairs: Sequence[tuple[int, int]], *, chat: bool = False) -> States:
    """The hidden states at ``(layer, token)`` pairs of ``prompt``, from one capture."""
    if not prompt:
        raise SelfieError("the original prompt is empty")
    if not pairs:
        raise SelfieError("no (layer, token) pairs given: need at least one")
    layers = [layer_index(model, int(L)) for L, _ in pairs]
    sites = sorted({layer_site(model, L) for L in layers}, key=lambda s: model.site(s))
    ids = model.encode([prompt], chat=chat)["input_ids"][0]
    T = ids.shape[0]
    bad = [t for _, t in pairs if not -T <= int(t) < T]
    if bad:
        raise SelfieError(f"token index {bad[0]} is beyond the prompt: it has {T} tokens (valid: 0..{T - 1} or "
                          f"-{T}..-1)")
    tokens = [int(t) % T for _, t in pairs]
    caps = capture(model, [prompt], sites, "all", chat=chat)
    stacked = torch.stack([caps[s][0] for s in sites])  # [S, T, d]
    which = torch.tensor([sites.index(layer_site(model, L)) for L in layers], device=stacked.device)
    vecs = stacked[which, torch.tensor(tokens, device=stacked.device)]
    texts = [token_str(model, int(ids[t])) for t in tokens]
    return States(vecs, list(zip(layers, tokens)), texts, T)


def typical_norm(model: Model, layer: int, texts: Sequence[str] | None = None) -> float:
    """The median norm of hidden-state layer ``L`` over the tokens of some plain texts (the first
    token of each text left out: its state is an outlier in most models)."""
    texts = list(texts or _NORM_TEXTS)
    site = layer_site(model, layer)
    caps = capture(model, texts, site, "all")
    keep = caps.mask.bool().clone()
    first = keep.int().argmax(1)
    keep[torch.arange(len(texts), device=keep.device), first] = False
    return float(caps[site][keep].norm(dim=-1).median())


_NORM_TEXTS = ("The weather was mild for most of the week, with a little rain on Tuesday.",
               "She opened the book and started reading the first chapter again.",
               "Prices of fresh vegetables rose slightly at the market this month.",
               "He fixed the bicycle in the garage before driving to work.")


# --- injection ---------------------------------------------------------------------------------------
class Inject(EditFn):
    """Write one state per batch row at the placeholder positions, in the forward call that feeds
    them (the prefill; decoding steps come after every placeholder and are left alone):
    ``replace`` overwrites, ``add`` adds ``strength * state``. Positions count from the start of
    the sequence, so a call after a cached prefix (``step.past_len > 0``) is handled."""

    def __init__(self, states: torch.Tensor, positions: Sequence[int], mode: str = "replace",
                 strength: float = 1.0):
        super().__init__("all")
        choose("injection mode", mode, MODES, SelfieError)
        if not positions:
            raise SelfieError("nothing to inject into: the interpretation prompt has no placeholder positions")
        self.states, self.positions, self.mode, self.strength = torch.as_tensor(states), list(positions), mode, strength

    def bind(self, site, feat_shape, device, dtype):
        s = self.states
        if s.dim() != 2 or tuple(s.shape[1:]) != tuple(feat_shape):
            raise SelfieError(f"states of shape {tuple(s.shape)} cannot be injected at {site!r}: need [rows, "
                              f"{feat_shape[0]}]")
        self._v = s.to(device=device, dtype=dtype)[:, None, :]
        self._pos = torch.tensor(self.positions, device=device)

    def __call__(self, act: torch.Tensor, step) -> torch.Tensor | None:
        if self.mode == "none":
            return None
        local = self._pos - step.past_len  # placeholder positions within this call
        inside = (local >= 0) & (local < act.shape[1])
        if not bool(inside.any()):
            return None  # a decoding step (or a cached prefix): nothing to write
        if not bool(inside.all()):
            raise SelfieError(f"this forward call covers only part of the placeholders (positions {self.positions}, "
                              f"call of {act.shape[1]} tokens after {step.past_len} cached)")
        if act.shape[0] != self._v.shape[0]:
            raise SelfieError(f"{self._v.shape[0]} states for a batch of {act.shape[0]} rows")
        out = act.clone()
        n = len(self.positions)
        if self.mode == "replace":
            out[:, local] = self._v.expand(-1, n, -1)
        else:
            out[:, local] = act[:, local] + self.strength * self._v
        return out


def _eos_ids(model: Model) -> list[int]:
    eos = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    eos = model.tok.eos_token_id if eos is None else eos
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]


@torch.no_grad()
def prefix_cache(model: Model, ip: InterpretationPrompt):
    """The KV cache of the tokens before the first placeholder (one row; None when there are none):
    the same for every row and untouched by the injection, so it is computed once."""
    n = ip.positions[0]
    if n == 0:
        return None
    return _cache_of(model.hf(input_ids=torch.tensor([ip.ids[:n]], device=model.device), use_cache=True))


def _cache_of(out):
    """The KV cache of a forward's output (``cache`` in recent transformers, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def _rows_of(cache, B: int):
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(B)
    return c


@torch.no_grad()
def generate_injected(model: Model, ip: InterpretationPrompt, states: torch.Tensor, k: int = 1,
                      mode: str = "replace", strength: float = 1.0, max_new_tokens: int = 30,
                      prefix=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations ``new [rows, <= max_new_tokens]`` of the interpretation prompt, one row
    per state, each row's state injected before block ``k`` at the placeholders during the prefill,
    and ``p_with [rows, n]``: the probability of each decoded token in that pass. The tokens
    decoded are the tokens fed, so this is the teacher-forced probability with the injection
    (:func:`token_probs` computes it with a separate forward; the tests check they agree).
    ``prefix``: :func:`prefix_cache` of ``ip`` (computed here when not given)."""
    site = injection_site(model, k)
    ids = torch.tensor([ip.ids], device=model.device).expand(states.shape[0], -1).contiguous()
    prefix = prefix_cache(model, ip) if prefix is None else prefix
    kw = {} if prefix is None else {"cache": _rows_of(prefix, ids.shape[0])}
    with edit(model, {site: Inject(states, ip.positions, mode, strength)}):
        out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=model.pad_id, output_logits=True, return_dict_in_generate=True, **kw)
    new = out.sequences[:, ids.shape[1]:]
    logp = torch.stack(out.logits, 1).float().log_softmax(-1)
    return new, logp.gather(-1, new[..., None]).squeeze(-1).exp()


def decode_injected(model: Model, ip: InterpretationPrompt, states: torch.Tensor, k: int = 1,
                    mode: str = "replace", strength: float = 1.0, max_new_tokens: int = 30,
                    prefix=None) -> torch.Tensor:
    """The greedy continuations of :func:`generate_injected` alone."""
    return generate_injected(model, ip, states, k, mode, strength, max_new_tokens, prefix)[0]


@torch.no_grad()
def prompt_cache(model: Model, ip: InterpretationPrompt):
    """``(cache, last_logits [1, vocab])`` of the whole interpretation prompt without injection (one
    row): what every row shares when nothing is injected."""
    out = model.hf(input_ids=torch.tensor([ip.ids], device=model.device), use_cache=True)
    return _cache_of(out), out.logits[:, -1:]


@torch.no_grad()
def probs_without(model: Model, ip: InterpretationPrompt, new: torch.Tensor, cached=None) -> torch.Tensor:
    """Teacher-forced probability ``[rows, n]`` of each decoded token without any injection: the
    prompt's cache (:func:`prompt_cache`, computed once) and one forward over the new tokens."""
    cache, last = cached if cached is not None else prompt_cache(model, ip)
    (B, n), P = new.shape, len(ip)
    logits = last.expand(B, -1, -1)
    if n > 1:
        kw: dict = {"cache": _rows_of(cache, B), "use_cache": True}
        if model.accepts("position_ids"):
            kw["position_ids"] = torch.arange(P, P + n - 1, device=new.device)[None].expand(B, -1)
        more = model.hf(input_ids=new[:, :-1], attention_mask=torch.ones(B, P + n - 1, dtype=torch.long,
                                                                          device=new.device), **kw).logits
        logits = torch.cat([logits, more], 1)
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, new[..., None]).squeeze(-1).exp()


def _logits_after_prefix(model: Model, ids: torch.Tensor, keep: int, prefix) -> torch.Tensor:
    """Logits of the last ``keep`` positions of ``ids`` (no padding), reusing the prefix cache."""
    if prefix is None:
        return model.forward(ids, torch.ones_like(ids), logits_to_keep=keep).logits
    n0, (B, T) = prefix.get_seq_length(), ids.shape
    kw: dict = {"cache": _rows_of(prefix, B), "use_cache": True}
    if model.accepts("position_ids"):
        kw["position_ids"] = torch.arange(n0, T, device=ids.device)[None].expand(B, -1)
    if model.accepts("logits_to_keep"):
        kw["logits_to_keep"] = keep
    return model.hf(input_ids=ids[:, n0:], attention_mask=torch.ones_like(ids), **kw).logits


@torch.no_grad()
def token_probs(model: Model, ip: InterpretationPrompt, new: torch.Tensor, states: torch.Tensor | None = None,
                k: int = 1, mode: str = "replace", strength: float = 1.0, prefix=None) -> torch.Tensor:
    """Teacher-forced probability ``[rows, n]`` of each decoded token, with the injection (``states``
    given) or without (None), in one batched forward (after the shared ``prefix`` cache, if given)."""
    B, n = new.shape
    ids = torch.cat([torch.tensor([ip.ids], device=new.device).expand(B, -1), new], 1)
    if states is None or mode == "none":
        logits = _logits_after_prefix(model, ids, n + 1, prefix)
    else:
        with edit(model, {injection_site(model, k): Inject(states, ip.positions, mode, strength)}):
            logits = _logits_after_prefix(model, ids, n + 1, prefix)
    logp = logits[:, -(n + 1):-1].float().log_softmax(-1)
    return logp.gather(-1, new[..., None]).squeeze(-1).exp()


# --- results -----------------------------------------------------------------------------------------
@dataclass
class Interpretation:
    """One interpreted state: where it came from, the text, its tokens and their relevancy."""

    layer: int | None
    token: int
    token_text: str
    text: str
    relevancy: float
    tokens: list[str] = field(default_factory=list)
    token_relevancy: list[float] = field(default_factory=list)

    def row(self) -> dict:
        return {"layer": self.layer, "token": self.token, "token_text": self.token_text,
                "interpretation": self.text, "relevancy": self.relevancy}


@dataclass
class SelfieResult:
    """Interpretations in the order asked, with the settings that produced them."""

    rows: list[Interpretation]
    prompt: str
    interpretation_prompt: str
    settings: dict

    def table(self) -> list[dict]:
        """One dict per interpretation: layer, token, token_text, interpretation, relevancy."""
        return [r.row() for r in self.rows]


def _check_common(mode: str, max_new_tokens: int, batch_size: int) -> None:
    choose("injection mode", mode, MODES, SelfieError)
    if max_new_tokens < 1 or batch_size < 1:
        raise SelfieError(f"max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")


def interpret_states(model: Model, states: torch.Tensor, interpretation=None, *, k: int = 1, mode: str = "replace",
                     strength: float = 1.0, max_new_tokens: int = 30, batch_size: int = 32,
                     relevancy: bool = True) -> list[tuple[str, list[str], list[float]]]:
    """Decode every state (rows of ``[N, d]``) through the interpretation prompt, ``batch_size``
    rows per generate; returns ``(text, tokens, per-token relevancy)`` per state."""
    _check_common(mode, max_new_tokens, batch_size)
    ip = as_interpretation_prompt(model, interpretation)
    injection_site(model, k)
    states = torch.as_tensor(states)
    if states.dim() != 2 or states.shape[1] != model.d_model:
        raise SelfieError(f"states must be [N, d_model={model.d_model}] for {model.name}, got shape {tuple(states.shape)}")
    if not torch.isfinite(states).all():
        raise SelfieError("states hold NaN or infinite values")
    eos = torch.tensor(_eos_ids(model) or [-1], device=model.device)
    prefix, cached = prefix_cache(model, ip), (prompt_cache(model, ip) if relevancy else None)
    out = []
    for chunk in states.to(model.device).split(batch_size):
        new, p_with = generate_injected(model, ip, chunk, k, mode, strength, max_new_tokens, prefix)
        keep = (torch.isin(new, eos).cumsum(1) == 0)
        if relevancy:  # nothing injected (mode none): nothing is relevant, by definition
            rel = torch.zeros_like(p_with) if mode == "none" else (p_with - probs_without(model, ip, new, cached)).abs()
        else:
            rel = torch.full(new.shape, float("nan"), device=new.device)
        lengths = keep.sum(1).tolist()
        for ids, n, r in zip(new.tolist(), lengths, rel.tolist()):
            text = model.tok.decode(ids[:n], skip_special_tokens=True)
            out.append((text, [token_str(model, i) for i in ids[:n]], r[:n]))
    return out


def _rows(decoded, layers, tokens, token_texts) -> list[Interpretation]:
    rows = []
    for (text, toks, rel), L, t, tt in zip(decoded, layers, tokens, token_texts):
        mean = sum(rel) / len(rel) if rel else 0.0
        rows.append(Interpretation(L, t, tt, text.strip(), float(mean), toks, [float(x) for x in rel]))
    return rows


def interpret(model: Model, prompt: str, pairs: Sequence[tuple[int, int]], interpretation=None, *, k: int = 1,
              mode: str = "replace", strength: float = 1.0, max_new_tokens: int = 30, batch_size: int = 32,
              chat: bool = False, relevancy: bool = True, intervention=None,
              apply_options: dict | None = None) -> SelfieResult:
    """Interpret the hidden states at ``(layer, token)`` pairs of ``prompt`` (HF layers: 0 =
    embeddings; negative tokens count from the end), read in one capture and decoded in batches.

    ``interpretation``: an :class:`InterpretationPrompt`, or parts (strings and placeholder counts),
    default :func:`interpretation_prompt`'s. ``chat`` renders the *original* prompt as a user turn.
    ``intervention``: applied (with ``apply_options``) while the states are *read*, e.g. a
    ``selfie-control`` edit; the interpretation prompt always runs on the unedited model."""
    _check_common(mode, max_new_tokens, batch_size)
    ip = as_interpretation_prompt(model, interpretation)
    injection_site(model, k)
    with intervention.apply(model, **(apply_options or {})) if intervention is not None else nullcontext():
        st = read_states(model, prompt, pairs, chat=chat)
    decoded = interpret_states(model, st.vectors, ip, k=k, mode=mode, strength=strength,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, relevancy=relevancy)
    rows = _rows(decoded, [L for L, _ in st.pairs], [t for _, t in st.pairs], st.token_texts)
    return SelfieResult(rows, prompt, ip.text(model), {"k": k, "mode": mode, "strength": strength,
                                                       "max_new_tokens": max_new_tokens, "chat": chat,
                                                       "intervention": getattr(intervention, "method", None)})


def interpret_vectors(model: Model, vectors: torch.Tensor, interpretation=None, *, k: int = 1,
                      norm: float | str | None = None, mode: str = "replace", strength: float = 1.0,
                      max_new_tokens: int = 30, batch_size: int = 32, labels: Sequence[str] | None = None,
                      relevancy: bool = True) -> SelfieResult:
    """Interpret arbitrary vectors ``[N, d]`` (a steering direction, a probe, a difference of means).

    ``norm``: rescale every vector to this norm first; ``"typical"`` uses :func:`typical_norm` of
    the layer the vectors are injected into (hidden-state layer ``k``), so a unit direction looks
    like a state. Rows carry ``layer=None``, ``token`` = the vector's index, ``token_text`` = its label."""
    v = torch.as_tensor(vectors).detach().float()
    v = v[None] if v.dim() == 1 else v
    if v.dim() != 2 or v.shape[1] != model.d_model:
        raise SelfieError(f"vectors must be [N, d_model={model.d_model}] for {model.name}, got shape "
                          f"{tuple(torch.as_tensor(vectors).shape)}")
    if labels is not None and len(labels) != v.shape[0]:
        raise SelfieError(f"{len(labels)} labels for {v.shape[0]} vectors")
    if norm is not None:
        if isinstance(norm, str) and norm != "typical":
            raise SelfieError(f"norm must be a number, 'typical' or None, got {norm!r}")
        target = typical_norm(model, injection_site_layer(model, k)) if norm == "typical" else float(norm)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target
    decoded = interpret_states(model, v, interpretation, k=k, mode=mode, strength=strength,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, relevancy=relevancy)
    names = list(labels) if labels is not None else [f"vector {i}" for i in range(v.shape[0])]
    rows = _rows(decoded, [None] * v.shape[0], list(range(v.shape[0])), names)
    ip = as_interpretation_prompt(model, interpretation)
    return SelfieResult(rows, "", ip.text(model), {"k": k, "mode": mode, "strength": strength, "norm": norm,
                                                   "max_new_tokens": max_new_tokens})


def injection_site_layer(model: Model, k: int) -> int:
    """The hidden-state layer that "before block ``k``" holds (= ``k``)."""
    injection_site(model, k)
    return k


# --- text forms and reports ------------------------------------------------------------------------
def parse_parts(text: str, marker: str = "[X]") -> list:
    """Interpretation-prompt parts from text where each run of ``marker`` is a placeholder group:
    ``"[X][X][X] Sum up"`` -> ``[3, " Sum up"]``."""
    if not marker:
        raise SelfieError("the placeholder marker must not be empty")
    parts: list = []
    for i, piece in enumerate(text.split(marker)):
        if i and (not parts or not isinstance(parts[-1], int)):
            parts.append(1)
        elif i:
            parts[-1] += 1
        if piece:
            parts.append(piece)
    return parts


def spread_layers(model: Model, n: int = 6) -> list[int]:
    """About ``n`` hidden-state layers evenly spread over 1..n_layers."""
    L = model.n_layers
    return sorted({max(1, round(L * (i + 1) / n)) for i in range(n)})


def grid_report(result: SelfieResult, title: str = "SelfIE interpretations"):
    """An :class:`~steerlab.report.html.HtmlReport`: a (layer x token) grid of the interpretations,
    then every interpretation with its relevancy and the per-token relevancy."""
    from ..report.html import HtmlReport

    page = HtmlReport(title, f"original prompt: {result.prompt!r}" if result.prompt else None)
    page.kv({"interpretation prompt": result.interpretation_prompt,
             **{k: v for k, v in result.settings.items()}})
    cols: dict[int, str] = {}
    for r in result.rows:
        cols.setdefault(r.token, f"{r.token}: {r.token_text!r}")
    cols = dict(sorted(cols.items()))
    grid: dict = {}
    for r in result.rows:
        grid.setdefault(r.layer, {"layer": "vectors" if r.layer is None else r.layer})[cols[r.token]] = \
            f"{r.text} (relevancy {r.relevancy:.2f})"
    page.heading("Grid: rows are layers (0 = embeddings), columns are tokens of the prompt")
    page.table(list(grid.values()), ["layer", *cols.values()], max_rows=None)
    page.heading("Every interpretation")
    page.table([{**r.row(), "token_relevancy": " ".join(f"{t!r}:{x:.2f}" for t, x in zip(r.tokens, r.token_relevancy))}
                for r in result.rows], max_rows=None)
    return page
