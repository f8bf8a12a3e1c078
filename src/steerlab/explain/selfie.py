"""SelfIE: the model describes its own hidden states in words (Chen et al. 2024; METHODS.md s4).

To interpret the hidden state ``h`` at (layer ``L``, token ``t``) of an original prompt, run an
*interpretation prompt* that holds placeholder tokens, overwrite the hidden state at every
placeholder position with ``h`` before decoder block ``k`` during the prefill only, and let the
model decode greedily: the text it writes is its description of ``h``.

Conventions:

- layers follow the site vocabulary (``numbering="blocks"``, the default): ``l`` is the output of
  block ``l`` (``blocks.{l}.resid_post``), ``0..n_layers-1``, negative from the end; the embeddings
  are the site ``embed`` (or ``blocks.0.resid_pre``). Any ``d_model`` site can be given by name
  instead (:func:`state_site`). ``numbering="hf"`` takes the paper's hidden-state index: ``L = 0``
  is the embeddings (read at ``blocks.0.resid_pre``, scaled for Gemma), ``L >= 1`` the output of
  block ``L - 1``, ``L = n_layers`` the last block's raw output (transformers' last
  ``hidden_states`` entry is after the final norm instead).
- "before decoder block ``k``" is the site ``blocks.{k}.resid_pre``: the input of block ``k``, the
  same tensor as ``hidden_states[k]``; ``k`` runs from 0 (overwrite the embeddings) to
  ``n_layers - 1``. The default ``k = 1`` writes the state after block 0.
- Injection modes: ``replace`` writes ``h``; ``add`` adds ``strength * h`` to what is there;
  ``none`` injects nothing (a control: what the interpretation prompt says on its own).
- Hidden states are injected, never embeddings built by hand, so embedding-scaled models (Gemma)
  need nothing special: the interpretation prompt's own embeddings come from the model's module.

Placeholder positions are exact for any tokenizer: the text parts are tokenized separately and
the placeholder token id is inserted between them, so no string search is involved.

Relevancy of interpretation token ``y_t`` is the treatment effect ``p_with(y_t) - p_without(y_t)``
(signed, the default; ``relevancy_form="absolute"`` takes its absolute value, as the public code's
formula reads), teacher-forced on the interpretation prompt plus the decoded tokens, with and
without the injection. A token the injection made *less* likely has a negative relevancy. The
random-state baseline (``baseline="norm"`` or ``"permute"``) interprets control states with the
real states' statistics, so "relevant" can be read against what any state of that size gets. ``p_with``
comes from the decoding pass itself (the tokens decoded are the tokens fed: that pass *is* the
teacher-forced forward with the injection); ``p_without`` from one batched forward over the
decoded tokens after the un-injected prompt, whose cache is computed once.

Many states are decoded together: every row runs the same interpretation prompt (no padding) and
one edit writes each row's own state. The tokens before the first placeholder are the same in
every row and untouched by the injection: their KV cache is computed once and shared.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..errors import SteerlabError
from ..hooks import EditFn, capture, edit
from ..models.model import Model, cache_of, cache_rows
from ..registry import choose
from ..validate import number
from .lens import token_str

MODES = ("replace", "add", "none")
RELEVANCY_FORMS = ("signed", "absolute")
BASELINES = ("norm", "permute")
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
NUMBERINGS = ("hf", "blocks")
STATE_KINDS = ("embed", "final", "resid_pre", "resid_post", "attn.out", "mlp.out")
"""Site kinds whose tensor is a ``d_model`` vector, so it can be injected as a hidden state."""
_HEAD_SITE = re.compile(r"^blocks\.(-?\d+)\.attn\.head\.(\d+)$")


def _check_numbering(numbering: str) -> None:
    choose("layer numbering", numbering, NUMBERINGS, SelfieError)


def layer_index(model: Model, layer: int, numbering: str = "hf") -> int:
    """A layer normalised to ``0..``: in HF indexing (``"hf"``, the paper's: 0 = embeddings .. n_layers,
    L = the output of block L-1) or in the site vocabulary's (``"blocks"``: l = the output of block l,
    ``0..n_layers-1``); negative counted from the end."""
    _check_numbering(numbering)
    n = model.n_layers
    lo, hi = (-(n + 1), n) if numbering == "hf" else (-n, n - 1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not lo <= layer <= hi:
        what = ("hidden-state layers are 0..{n} (0 = embeddings, L = output of block L-1), or -{m}..-1 from the end"
                if numbering == "hf" else "blocks are 0..{h} (l = the state after block l, blocks.l.resid_post), or "
                "-{n}..-1 from the end; the embeddings are the site 'embed'")
        raise SelfieError(f"layer {layer!r} is out of range for {model.name}: " + what.format(n=n, m=n + 1, h=n - 1))
    return layer % (hi + 1)


def layer_site(model: Model, layer: int, numbering: str = "hf") -> str:
    """The site of a layer: HF ``L`` is ``blocks.0.resid_pre`` for 0, else ``blocks.{L-1}.resid_post``;
    block ``l`` (``numbering="blocks"``) is ``blocks.{l}.resid_post``."""
    L = layer_index(model, layer, numbering)
    if numbering == "blocks":
        return f"blocks.{L}.resid_post"
    return "blocks.0.resid_pre" if L == 0 else f"blocks.{L - 1}.resid_post"


def state_site(model: Model, name: str) -> tuple[str, int | None]:
    """``(site to capture, head or None)`` for a ``d_model``-dimensional site name: one of
    :data:`STATE_KINDS` (``blocks.3.attn.out``, ``blocks.3.mlp.out``, ``blocks.3.resid_pre``, ``embed``,
    ...) or ``blocks.{l}.attn.head.{h}``, head ``h``'s output through the attention output projection
    (read from ``blocks.{l}.attn.heads``)."""
    m = _HEAD_SITE.match(name)
    try:
        site = model.site(f"blocks.{m.group(1)}.attn.heads" if m else name)
    except SteerlabError as e:
        raise SelfieError(f"{e}; or 'blocks.{{l}}.attn.head.{{h}}' for one head's output") from e
    if m:
        h = int(m.group(2))
        if not 0 <= h < model.n_heads:
            raise SelfieError(f"head {h} is out of range in {name!r}: {model.name} has {model.n_heads} heads per layer")
        return site.name, h
    if site.kind not in STATE_KINDS:
        raise SelfieError(f"site {name!r} is not a d_model vector, so it cannot be injected as a hidden state; "
                          f"interpretable kinds: {', '.join(STATE_KINDS)}, or 'blocks.{{l}}.attn.head.{{h}}'")
    return site.name, None


def head_output(model: Model, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
    """Head ``head``'s contribution ``[N, d_model]`` through block ``layer``'s attention output projection,
    from the projection's input ``z [N, n_heads, d_head]`` (every other head zeroed, the bias taken out;
    what comes after the projection, e.g. Gemma 2/3's post-attention norm, is not applied)."""
    o = model.site(f"blocks.{layer}.attn.heads").module  # the projection whose input is the heads
    only = torch.zeros_like(z)
    only[:, head] = z[:, head]
    flat = only.reshape(z.shape[0], -1)
    p = next(o.parameters())
    with torch.no_grad():
        x = flat.to(device=p.device, dtype=p.dtype)
        return (o(x) - o(torch.zeros_like(x))).float()


def _resolve(model: Model, where, numbering: str) -> tuple[object, str, int | None]:
    """``(label, site to capture, head)`` of one pair's first element (an int layer or a site name)."""
    if isinstance(where, str):
        site, head = state_site(model, where)
        return (where if head is not None else site), site, head
    L = layer_index(model, where, numbering)
    return L, layer_site(model, L, numbering), None


def injection_site(model: Model, k: int) -> str:
    """The site "before decoder block ``k``": ``blocks.{k}.resid_pre`` (= ``hidden_states[k]``)."""
    n = model.n_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
        raise SelfieError(f"injection block k={k!r} is out of range for {model.name}: inject before block 0..{n - 1}")
    return f"blocks.{k}.resid_pre"


@dataclass
class States:
    """Hidden states read from one prompt: ``vectors [N, d]`` (float32, on the model's device) at
    ``pairs`` (normalised ``(layer or site, token)``), the text of each token, and the prompt's token count."""

    vectors: torch.Tensor
    pairs: list[tuple[object, int]]
    token_texts: list[str]
    n_tokens: int


@torch.no_grad()
def read_states(model: Model, prompt: str, pairs: Sequence[tuple], *, chat: bool = False,
                numbering: str = "blocks") -> States:
    """The states at ``(where, token)`` pairs of ``prompt``, from one capture: ``where`` is a layer
    (``numbering``: ``"blocks"``, l = after block l, or ``"hf"``, 0 = embeddings) or a site name
    (:func:`state_site`: ``blocks.3.attn.out``, ``blocks.3.mlp.out``, ``blocks.3.attn.head.2``, ...)."""
    if not prompt:
        raise SelfieError("the original prompt is empty")
    if not pairs:
        raise SelfieError("no (layer, token) pairs given: need at least one")
    resolved = [_resolve(model, w, numbering) for w, _ in pairs]
    sites = sorted({r[1] for r in resolved}, key=lambda s: model.site(s))
    ids = model.encode([prompt], chat=chat)["input_ids"][0]
    T = ids.shape[0]
    bad = [t for _, t in pairs if not -T <= int(t) < T]
    if bad:
        raise SelfieError(f"token index {bad[0]} is beyond the prompt: it has {T} tokens (valid: 0..{T - 1} or "
                          f"-{T}..-1)")
    tokens = [int(t) % T for _, t in pairs]
    caps = capture(model, [prompt], sites, "all", chat=chat)
    vecs = []
    for (_, site, head), t in zip(resolved, tokens):
        x = caps[site][0, t]
        vecs.append(head_output(model, model.site(site).layer, head, x[None])[0] if head is not None else x)
    texts = [token_str(model, int(ids[t])) for t in tokens]
    return States(torch.stack(vecs).float(), [(r[0], t) for r, t in zip(resolved, tokens)], texts, T)


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
        strength = number(strength, "the injection strength (--strength)")  # NaN would read as text 'nan'
        self.states, self.positions, self.mode, self.strength = torch.as_tensor(states), list(positions), mode, strength
        if not bool(torch.isfinite(self.states).all()):
            raise SelfieError("the states to inject hold NaN or infinite values")

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
    return cache_of(model.hf(input_ids=torch.tensor([ip.ids[:n]], device=model.device), use_cache=True))


def _rows_of(cache, B: int):
    """``B`` copies of a one-row cache."""
    return cache_rows(cache, torch.zeros(B, dtype=torch.long))


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
    return cache_of(out), out.logits[:, -1:]


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

    layer: int | str | None
    token: int
    token_text: str
    text: str
    relevancy: float
    tokens: list[str] = field(default_factory=list)
    token_relevancy: list[float] = field(default_factory=list)
    baseline: float | None = None

    def row(self) -> dict:
        out = {"layer": self.layer, "token": self.token, "token_text": self.token_text,
               "interpretation": self.text, "relevancy": self.relevancy}
        if self.baseline is not None:
            out["baseline_relevancy"] = self.baseline
        return out


@dataclass
class SelfieResult:
    """Interpretations in the order asked, with the settings that produced them."""

    rows: list[Interpretation]
    prompt: str
    interpretation_prompt: str
    settings: dict
    baseline_rows: list[Interpretation] = field(default_factory=list)

    def table(self) -> list[dict]:
        """One dict per interpretation: layer, token, token_text, interpretation, relevancy (and the
        relevancy of its random control state when a baseline was asked for)."""
        return [r.row() for r in self.rows]

    def baseline_summary(self) -> dict | None:
        """Mean and 95th percentile of the control states' relevancy, and the share of real states
        above that percentile (None without a baseline)."""
        if not self.baseline_rows:
            return None
        b = torch.tensor([r.relevancy for r in self.baseline_rows])
        q95 = float(torch.quantile(b, 0.95)) if b.numel() > 1 else float(b[0])
        return {"kind": self.settings.get("baseline"), "n": int(b.numel()), "mean": float(b.mean()), "q95": q95,
                "real_mean": sum(r.relevancy for r in self.rows) / len(self.rows),
                "share_above_q95": sum(r.relevancy > q95 for r in self.rows) / len(self.rows)}


def _check_common(mode: str, max_new_tokens: int, batch_size: int, form: str = "signed",
                  baseline: str | None = None) -> None:
    choose("relevancy form", form, RELEVANCY_FORMS, SelfieError)
    if baseline is not None:
        choose("baseline", baseline, BASELINES, SelfieError)
    choose("injection mode", mode, MODES, SelfieError)
    if max_new_tokens < 1 or batch_size < 1:
        raise SelfieError(f"max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")


def interpret_states(model: Model, states: torch.Tensor, interpretation=None, *, k: int = 1, mode: str = "replace",
                     strength: float = 1.0, max_new_tokens: int = 30, batch_size: int = 32,
                     relevancy: bool = True, relevancy_form: str = "signed") -> list[tuple[str, list[str], list[float]]]:
    """Decode every state (rows of ``[N, d]``) through the interpretation prompt, ``batch_size``
    rows per generate; returns ``(text, tokens, per-token relevancy)`` per state (relevancy
    ``p_with - p_without``, or its absolute value with ``relevancy_form="absolute"``)."""
    _check_common(mode, max_new_tokens, batch_size, relevancy_form)
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
            rel = torch.zeros_like(p_with) if mode == "none" else p_with - probs_without(model, ip, new, cached)
            rel = rel.abs() if relevancy_form == "absolute" else rel
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


def control_states(states: torch.Tensor, kind: str = "norm", seed: int = 0) -> torch.Tensor:
    """Random control states with the real states' statistics, one per row of ``states``:
    ``"norm"``, a random Gaussian direction scaled to the row's norm; ``"permute"``, the row's own
    coordinates in a random order (same norm, same distribution of values, no structure)."""
    choose("baseline", kind, BASELINES, SelfieError)
    g = torch.Generator().manual_seed(seed)
    x = states.detach().float().cpu()
    if kind == "norm":
        r = torch.randn(x.shape, generator=g)
        out = r / r.norm(dim=-1, keepdim=True) * x.norm(dim=-1, keepdim=True)
    else:
        out = torch.stack([row[torch.randperm(x.shape[1], generator=g)] for row in x])
    return out.to(states.device)


def _decode_with_baseline(model, vectors, ip, opts: dict, baseline: str | None, labels):
    """The real rows and, with a baseline, the control rows; each real row carries its control's relevancy."""
    layers, tokens, texts = labels
    rows = _rows(interpret_states(model, vectors, ip, **opts), layers, tokens, texts)
    if baseline is None:
        return rows, []
    ctrl = _rows(interpret_states(model, control_states(vectors, baseline), ip, **opts), layers, tokens,
                 [f"{baseline} control of {t!r}" for t in texts])
    for r, c in zip(rows, ctrl):
        r.baseline = c.relevancy
    return rows, ctrl


def interpret(model: Model, prompt: str, pairs: Sequence[tuple], interpretation=None, *, k: int = 1,
              mode: str = "replace", strength: float = 1.0, max_new_tokens: int = 30, batch_size: int = 32,
              chat: bool = False, relevancy: bool = True, intervention=None,
              apply_options: dict | None = None, numbering: str = "blocks", relevancy_form: str = "signed",
              baseline: str | None = None) -> SelfieResult:
    """Interpret the states at ``(where, token)`` pairs of ``prompt`` (negative tokens count from the
    end), read in one capture and decoded in batches. ``where``: a layer (``numbering="blocks"``, the
    default: l = after block l = ``blocks.l.resid_post``, the site vocabulary's; ``"hf"``: the paper's
    hidden-state index, 0 = embeddings, L = after block L-1) or any ``d_model`` site name (:func:`state_site`: ``blocks.3.attn.out``,
    ``blocks.3.mlp.out``, ``blocks.3.resid_pre``, ``blocks.3.attn.head.1``).

    ``interpretation``: an :class:`InterpretationPrompt`, or parts (strings and placeholder counts),
    default :func:`interpretation_prompt`'s. ``chat`` renders the *original* prompt as a user turn.
    ``intervention``: applied (with ``apply_options``) while the states are *read*, e.g. a
    ``selfie-control`` edit; the interpretation prompt always runs on the unedited model.
    ``relevancy_form``: ``"signed"`` (``p_with - p_without``) or ``"absolute"``. ``baseline``:
    ``"norm"`` or ``"permute"`` also interprets one random control state per state
    (:func:`control_states`); see :meth:`SelfieResult.baseline_summary`."""
    _check_common(mode, max_new_tokens, batch_size, relevancy_form, baseline)
    ip = as_interpretation_prompt(model, interpretation)
    injection_site(model, k)
    with intervention.apply(model, **(apply_options or {})) if intervention is not None else nullcontext():
        st = read_states(model, prompt, pairs, chat=chat, numbering=numbering)
    opts = dict(k=k, mode=mode, strength=strength, max_new_tokens=max_new_tokens, batch_size=batch_size,
                relevancy=relevancy, relevancy_form=relevancy_form)
    labels = ([L for L, _ in st.pairs], [t for _, t in st.pairs], st.token_texts)
    rows, ctrl = _decode_with_baseline(model, st.vectors, ip, opts, baseline, labels)
    return SelfieResult(rows, prompt, ip.text(model), {"k": k, "mode": mode, "strength": strength,
                                                       "max_new_tokens": max_new_tokens, "chat": chat,
                                                       "intervention": getattr(intervention, "method", None),
                                                       "layer_numbering": numbering, "relevancy": relevancy_form,
                                                       "baseline": baseline}, ctrl)


def interpret_vectors(model: Model, vectors: torch.Tensor, interpretation=None, *, k: int = 1,
                      norm: float | str | None = None, mode: str = "replace", strength: float = 1.0,
                      max_new_tokens: int = 30, batch_size: int = 32, labels: Sequence[str] | None = None,
                      relevancy: bool = True, relevancy_form: str = "signed",
                      baseline: str | None = None) -> SelfieResult:
    """Interpret arbitrary vectors ``[N, d]`` (a steering direction, a probe, a difference of means).

    ``norm``: rescale every vector to this norm first; ``"typical"`` uses :func:`typical_norm` of
    the layer the vectors are injected into (hidden-state layer ``k``), so a unit direction looks
    like a state. Rows carry ``layer=None``, ``token`` = the vector's index, ``token_text`` = its
    label. ``relevancy_form`` and ``baseline`` as in :func:`interpret`."""
    _check_common(mode, max_new_tokens, batch_size, relevancy_form, baseline)
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
    names = list(labels) if labels is not None else [f"vector {i}" for i in range(v.shape[0])]
    ip = as_interpretation_prompt(model, interpretation)
    opts = dict(k=k, mode=mode, strength=strength, max_new_tokens=max_new_tokens, batch_size=batch_size,
                relevancy=relevancy, relevancy_form=relevancy_form)
    rows, ctrl = _decode_with_baseline(model, v.to(model.device), ip, opts, baseline,
                                       ([None] * v.shape[0], list(range(v.shape[0])), names))
    return SelfieResult(rows, "", ip.text(model), {"k": k, "mode": mode, "strength": strength, "norm": norm,
                                                   "max_new_tokens": max_new_tokens, "relevancy": relevancy_form,
                                                   "baseline": baseline}, ctrl)


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


def spread_layers(model: Model, n: int = 6, numbering: str = "blocks") -> list[int]:
    """About ``n`` layers evenly spread over the blocks' outputs (blocks 0..n_layers-1, or HF 1..n_layers)."""
    L = model.n_layers
    hf = sorted({max(1, round(L * (i + 1) / n)) for i in range(n)})
    return hf if numbering == "hf" else [x - 1 for x in hf]


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
    numbering = result.settings.get("layer_numbering", "blocks")
    page.heading("Grid: rows are " + ("hidden-state layers (HF: 0 = embeddings, L = after block L-1)"
                                      if numbering == "hf" else "sites (a number l = after block l)")
                 + ", columns are tokens of the prompt")
    page.table(list(grid.values()), ["layer", *cols.values()], max_rows=None)
    page.heading("Every interpretation")
    page.table([{**r.row(), "token_relevancy": " ".join(f"{t!r}:{x:.2f}" for t, x in zip(r.tokens, r.token_relevancy))}
                for r in result.rows], max_rows=None)
    return page
