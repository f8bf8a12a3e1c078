"""Input-output attribution of instruction following (Wu et al., arXiv 2310.00492, METHODS.md 2).

For a prompt ``x`` and a response ``y`` (teacher-forced), ``o_j = P(y_j | x, y_<j)`` and
``a_ij = sum_d (d o_j / d E_i,d) E_i,d`` (gradient x input) over the prompt tokens ``i``, with ``E``
the input embeddings as the model builds them: the output of the model's embedding module (for
Gemma it includes the ``sqrt(d_model)`` scale) fed back as ``inputs_embeds``. Gradient x input is
unchanged by any constant scale the model applies after that module, so ``a`` equals the gradient x
input at the first block's input on every architecture.

Then ``a~_ij = max(0, a_ij) / max_i' max(0, a_i'j)``, ``q_ij = ceil(10 a~_ij)`` with every
``q <= b`` set to zero (``b = 7``), the importance density ``d_i = ||q_i||_1 / ||q_i||_4`` divided by
its maximum over the prompt (as the public ``utils.compute_density`` does; without it ``S`` grows with
the response's length) and the instruction score ``S = sum_{i in instruction} d_i / log2(2 +
|instruction|)``.

The reverse path runs one forward and then the vector-Jacobian products of all output tokens at
once (``torch.autograd.grad(..., is_grads_batched=True)``) in chunks of ``chunk`` output tokens.
The forward path uses that ``a_ij`` is the directional derivative of ``o_j`` along the tangent equal
to ``E_i`` at position ``i`` and 0 elsewhere: one Jacobian-vector product per *prompt* token
(``torch.func.jvp`` under ``vmap``, ``chunk`` tangents at a time, eager attention since the CPU
flash-attention kernel has no forward-mode formula) gives all output tokens at once.
:func:`attribute_loop` (one backward per output token) is kept as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import EmptyInputError, ShapeError, SteerlabError
from ..models.model import Model
from ..registry import choose

B_DEFAULT = 7


class SpanError(SteerlabError):
    """An instruction span that is not part of the prompt (or covers no prompt token)."""


# --- the maths on a score matrix ----------------------------------------------------------------
def normalise(a: np.ndarray) -> np.ndarray:
    """``a~_ij = max(0, a_ij) / max_i' max(0, a_i'j)`` per output token ``j`` (columns of ``a``
    ``[n_in, n_out]``); a column with no positive entry is all zeros."""
    a = np.clip(np.asarray(a, dtype=np.float64), 0.0, None)
    top = a.max(axis=0, keepdims=True) if a.size else np.zeros((1, a.shape[1]))
    return np.divide(a, top, out=np.zeros_like(a), where=top > 0)


def quantise(a: np.ndarray, b: int = B_DEFAULT) -> np.ndarray:
    """``q = ceil(10 a~)`` with ``q <= b`` set to 0 (``a``: raw scores ``[n_in, n_out]``)."""
    q = np.ceil(10.0 * normalise(a) - 1e-9)
    q[q <= b] = 0.0
    return q


def threshold(q: np.ndarray, b: int = B_DEFAULT) -> np.ndarray:
    """Already quantised scores ``q`` (integers 0..10) with every ``q <= b`` set to 0."""
    q = np.array(q, dtype=np.float64)
    q[q <= b] = 0.0
    return q


def importance_density(a: np.ndarray, b: int = B_DEFAULT, prompt_max: bool = True,
                       quantised: bool = False) -> np.ndarray:
    """``d_i = ||q_i||_1 / ||q_i||_4`` for every input token ``i`` (0 where ``q_i`` is all zero),
    divided by ``max_i' d_i'`` (the paper's per-prompt normalisation, the default).

    ``prompt_max=False`` keeps the raw density, which grows with the number of output tokens (a
    token's density can reach ``n_out ** 0.75``): not the paper's score. ``quantised=True`` takes
    ``a`` as already quantised ``q`` (as the authors saved their matrices; the public code skips the
    normalisation for a matrix whose values span exactly 0..10) and only applies the threshold."""
    q = threshold(a, b) if quantised else quantise(a, b)
    l1 = q.sum(axis=1)
    l4 = (q ** 4).sum(axis=1) ** 0.25
    d = np.divide(l1, l4, out=np.zeros_like(l1), where=l4 > 0)
    top = d.max() if d.size else 0.0
    return d / top if prompt_max and top > 0 else d


def instruction_score(density: np.ndarray, tokens: Sequence[int]) -> float:
    """``S = sum_{i in tokens} d_i / log2(2 + |tokens|)``."""
    idx = np.asarray(list(tokens), dtype=np.int64)
    if idx.size == 0:
        raise SpanError("the instruction span covers no prompt token")
    return float(np.asarray(density, dtype=np.float64)[idx].sum() / math.log2(2 + idx.size))


# --- the attribution itself ---------------------------------------------------------------------
@dataclass
class Attribution:
    """Gradient x input of each response token's probability on each prompt token.

    ``scores`` is ``[n_in, n_out]`` (``a_ij``); ``text`` is the prompt as fed to the model (the chat
    rendering when ``chat``), ``user`` the prompt as given and ``user_start`` where it starts in
    ``text`` (-1 when the chat template changed it); ``offsets`` are the character spans of the
    prompt tokens in ``text``. Only the kept prompt tokens have rows (``positions``: their positions
    in the model's input; ``dropped``: the tokens left out, see :func:`kept_positions`)."""

    text: str
    user: str
    user_start: int
    response: str
    prompt_tokens: list[str]
    response_tokens: list[str]
    offsets: list[tuple[int, int]]
    scores: np.ndarray
    probs: np.ndarray
    response_pieces: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def prompt_pieces(self) -> list[str]:
        """The text of each prompt token (its token string when it has no characters, e.g. <bos>)."""
        return [self.text[a:z] if z > a else t for (a, z), t in zip(self.offsets, self.prompt_tokens)]

    def density(self, b: int = B_DEFAULT, prompt_max: bool = True) -> np.ndarray:
        """Importance density of every prompt token (see :func:`importance_density`)."""
        return importance_density(self.scores, b, prompt_max)

    def span_tokens(self, span: str | tuple[int, int]) -> list[int]:
        """Prompt tokens overlapping ``span``: a substring of the user prompt (first occurrence) or
        ``(start, end)`` character offsets into it."""
        if isinstance(span, str):
            at = self.user.find(span) if span else -1
            if at < 0:
                raise SpanError(f"instruction span {span!r} is not in the prompt {self.user!r}")
            start, end = at, at + len(span)
        else:
            start, end = (int(x) for x in span)
            if not 0 <= start < end <= len(self.user):
                raise SpanError(f"instruction span {span} is outside the prompt (0..{len(self.user)})")
        if self.user_start < 0:
            raise SpanError("the chat template changed the prompt's text, so spans cannot be located in it; "
                            "attribute with chat=False")
        s, e = start + self.user_start, end + self.user_start
        toks = [i for i, (a, z) in enumerate(self.offsets) if z > a and a < e and z > s]
        if not toks:
            raise SpanError(f"instruction span {span!r} covers no prompt token")
        return toks

    def instruction_score(self, span: str | tuple[int, int], b: int = B_DEFAULT, prompt_max: bool = True) -> float:
        return instruction_score(self.density(b, prompt_max), self.span_tokens(span))


PROMPT_TOKENS = ("user", "text", "all")
SEPARATOR = " "


def special_ids(model: Model) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding, chat-template markers such as
    ``<|im_start|>`` or ``<start_of_turn>``: every token the tokenizer flags as special)."""
    tok = model.tok
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def kept_positions(model: Model, p_ids: Sequence[int], offsets, start: int, user_len: int,
                   prompt_tokens: str) -> list[int]:
    """The prompt positions that get an attribution row.

    ``"user"`` (default): the tokens whose characters overlap the user's prompt, so special tokens,
    the chat template's markers and any text it adds (a default system prompt) are left out, as in
    the paper, whose matrices cover the prompt's own tokens only (BOS dropped); when the template
    changed the prompt's text, as ``"text"``. ``"text"``: every token but the special ones.
    ``"all"``: every prompt token."""
    choose("prompt_tokens", prompt_tokens, PROMPT_TOKENS, ShapeError)
    n = len(p_ids)
    if prompt_tokens == "all":
        return list(range(n))
    special = special_ids(model)
    keep = [i for i in range(n) if p_ids[i] not in special]
    if prompt_tokens == "user" and start >= 0:
        end = start + user_len
        keep = [i for i in keep if offsets[i][1] > offsets[i][0] and offsets[i][0] < end and offsets[i][1] > start]
    if not keep:
        raise EmptyInputError("no prompt token is left once special tokens are excluded "
                              "(prompt_tokens='all' keeps them)")
    return keep


def response_ids(model: Model, text: str, p_ids: list[int], response: str, separator: str,
                 add_special: bool) -> list[int]:
    """The response's ids as the tokenizer sees them after the prompt: ``text + separator +
    response`` tokenized as one string (as the paper's code does), the prompt's ids cut off; when
    the join merges tokens across the boundary, the response (with its separator) tokenized on its
    own. No separator is added when the prompt ends or the response starts with white space."""
    sep = "" if not text or text[-1].isspace() or response[:1].isspace() else separator
    full = list(model.tok(text + sep + response, add_special_tokens=add_special)["input_ids"])
    special = special_ids(model)
    while full and full[-1] in special and len(full) > len(p_ids):
        full.pop()  # an end-of-sequence token the tokenizer appends
    if full[:len(p_ids)] == p_ids and len(full) > len(p_ids):
        return full[len(p_ids):]
    return list(model.tok(sep + response, add_special_tokens=False)["input_ids"])


def _prepare(model: Model, prompt: str, response: str | None, chat: bool | None, max_new_tokens: int,
             separator: str = SEPARATOR):
    """Token ids of the prompt (with offsets) and of the response (given or greedy)."""
    if not prompt:
        raise EmptyInputError("the prompt is empty: attribution needs at least one prompt token")
    use_chat = bool(model.chat_template) if chat is None else chat
    text = model.chat_text(prompt) if use_chat else prompt
    enc = model.tok(text, add_special_tokens=not use_chat, return_offsets_mapping=True)
    p_ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if response is None:
        r_ids = greedy_response(model, p_ids, max_new_tokens)
    elif use_chat or not response:
        r_ids = list(model.tok(response, add_special_tokens=False)["input_ids"])
    else:
        r_ids = response_ids(model, text, p_ids, response, separator, True)
    if not r_ids:
        raise EmptyInputError("the response is empty: attribution needs at least one response token "
                              "(give a non-empty --response, or let the model generate one)")
    return text, text.find(prompt), p_ids, offsets, r_ids


def greedy_response(model: Model, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> list[int]:
    """The model's greedy continuation of ``prompt_ids``, cut before the first end-of-sequence token."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    with torch.no_grad():
        out = model.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=model.pad_id)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.tok.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | set(_eos_ids(model))
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    return new[:cut]


def _eos_ids(model: Model) -> list[int]:
    eos = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else (list(eos) if isinstance(eos, list | tuple) else [eos])


def embed_inputs(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings as the model builds them (output of its embedding module), a leaf that
    requires grad, ``[1, T, d]`` in the model's dtype on its device."""
    with torch.no_grad():
        e = model.hf.get_input_embeddings()(ids)
    return e.detach().clone().requires_grad_(True)


def output_probs(model: Model, E: torch.Tensor, n_prompt: int, targets: torch.Tensor) -> torch.Tensor:
    """``o_j = P(y_j | x, y_<j)`` for the response tokens ``targets`` ``[n_out]`` (one forward)."""
    T = E.shape[1]
    kw: dict = {"use_cache": False, "attention_mask": torch.ones((1, T), dtype=torch.long, device=E.device)}
    if model.accepts("position_ids"):
        kw["position_ids"] = torch.arange(T, device=E.device)[None]
    logits = model.hf(inputs_embeds=E, **kw).logits[0, n_prompt - 1: T - 1].float()
    return logits.softmax(-1).gather(1, targets[:, None])[:, 0]


def _setup(model: Model, prompt, response, chat, max_new_tokens, separator=SEPARATOR):
    text, start, p_ids, offsets, r_ids = _prepare(model, prompt, response, chat, max_new_tokens, separator)
    ids = torch.tensor([p_ids + r_ids], device=model.device)
    E = embed_inputs(model, ids)
    targets = torch.tensor(r_ids, device=model.device)
    return text, start, p_ids, offsets, r_ids, E, targets


def _result(model, prompt, text, start, p_ids, offsets, r_ids, scores, probs, prompt_tokens) -> Attribution:
    """The attribution restricted to the kept prompt positions (:func:`kept_positions`)."""
    keep = kept_positions(model, p_ids, offsets, start, len(prompt), prompt_tokens)
    conv = model.tok.convert_ids_to_tokens
    toks = list(conv(p_ids))
    kept = set(keep)
    dropped = [toks[i] for i in range(len(p_ids)) if i not in kept]
    return Attribution(text, prompt, start, model.tok.decode(r_ids), [toks[i] for i in keep], list(conv(r_ids)),
                       [offsets[i] for i in keep], scores[keep], probs, model.tok.batch_decode([[i] for i in r_ids]),
                       keep, dropped)


def _head_grads(model: Model, H: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``o_k`` and ``d o_k / d h_k`` for final hidden rows ``H`` ``[c, d]`` (row ``k`` predicts
    ``targets[k]``): one backward, since each ``o_k`` depends on its own row only."""
    h = H.detach().requires_grad_(True)
    logits = model.unembed.logits(h)  # the head and the soft-cap, differentiable
    o = logits.softmax(-1).gather(1, targets[:, None])[:, 0]
    (g,) = torch.autograd.grad(o.sum(), h)
    return o.detach(), g


def _chunk_scores(model: Model, E: torch.Tensor, n_in: int, s: int, targets: torch.Tensor):
    """Scores ``[c, n_in]`` and probabilities of output tokens ``s .. s + c - 1``: a forward of the
    decoder stack over the positions they depend on (causal), the head's gradients, then one
    batched vector-Jacobian product through the stack for the ``c`` tokens."""
    c = targets.shape[0]
    L = n_in + s + c - 1
    kw: dict = {"use_cache": False, "attention_mask": torch.ones((1, L), dtype=torch.long, device=E.device)}
    if model.accepts("position_ids"):
        kw["position_ids"] = torch.arange(L, device=E.device)[None]
    H = model.hf.base_model(inputs_embeds=E[:, :L], **kw).last_hidden_state[0]  # [L, d]
    rows = torch.arange(n_in - 1 + s, L, device=E.device)
    o, g = _head_grads(model, H[rows], targets)
    seeds = torch.zeros((c, L, H.shape[-1]), dtype=H.dtype, device=H.device)
    seeds[torch.arange(c, device=E.device), rows] = g.to(H.dtype)
    (gE,) = torch.autograd.grad(H, E, grad_outputs=seeds, is_grads_batched=True)
    return (gE[:, 0, :n_in].float() * E[0, :n_in].detach().float()).sum(-1), o


@contextmanager
def eager_attention(model: Model):
    """Run the model with eager attention (forward-mode AD has no formula for the fused kernels);
    the model's own implementation comes back on exit, also on errors."""
    old = model.hf.config._attn_implementation
    if old != "eager":
        model.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if old != "eager":
            model.hf.set_attn_implementation(old)


def _forward_scores(model: Model, E: torch.Tensor, n_in: int, targets: torch.Tensor, chunk: int):
    """Scores ``[n_in, n_out]`` and probabilities by forward mode: the head's gradients at the final
    hidden rows, then one JVP per prompt token (``chunk`` tangents per ``vmap``) through the stack
    over the positions the outputs need (the last token predicts nothing)."""
    from torch.func import jvp, vmap

    T = E.shape[1] - 1
    e = E[:, :T].detach()
    kw: dict = {"use_cache": False, "attention_mask": torch.ones((1, T), dtype=torch.long, device=E.device)}
    if model.accepts("position_ids"):
        kw["position_ids"] = torch.arange(T, device=E.device)[None]
    rows = torch.arange(n_in - 1, T, device=E.device)

    def stack(x):
        return model.hf.base_model(inputs_embeds=x, **kw).last_hidden_state[0]

    with eager_attention(model):
        with torch.no_grad():
            H = stack(e)
        with torch.enable_grad():
            o, g = _head_grads(model, H[rows], targets)
        g = g.to(H.dtype)

        def one(t):
            return (jvp(stack, (e,), (t,))[1][rows] * g).sum(-1)

        cols = []
        with torch.no_grad():
            for s in range(0, n_in, chunk):
                idx = torch.arange(s, min(n_in, s + chunk), device=E.device)
                tangents = torch.zeros((len(idx), 1, T, E.shape[-1]), dtype=E.dtype, device=E.device)
                tangents[torch.arange(len(idx), device=E.device), 0, idx] = e[0, idx]
                cols.append(vmap(one)(tangents).float())
    return torch.cat(cols), o


MODES = ("auto", "reverse", "forward")


def choose_mode(n_in: int, n_out: int) -> str:
    """``forward`` when the prompt has fewer than half as many tokens as the response, else
    ``reverse``: per product the two cost about the same on a CPU (one JVP over the whole sequence
    vs one VJP over the positions before its token; benchmarks/bench_attribution.py)."""
    return "forward" if 2 * n_in < n_out else "reverse"


def attribute(model: Model, prompt: str, response: str | None = None, chat: bool | None = None,
              max_new_tokens: int = 32, chunk: int = 16, mode: str = "auto", prompt_tokens: str = "user",
              separator: str = SEPARATOR) -> Attribution:
    """Gradient x input attribution of every response token on every prompt token (batched).

    ``response=None`` generates one greedily (at most ``max_new_tokens``). ``chat=None`` renders the
    prompt as a user turn when the model has a chat template. ``mode="reverse"``: output tokens are
    taken ``chunk`` at a time, one forward of the decoder stack over the positions the chunk depends
    on, then one batched vector-Jacobian product for all its tokens; ``mode="forward"``: ``chunk``
    prompt-token tangents per batched Jacobian-vector product; ``"auto"``: :func:`choose_mode`.
    Memory grows with ``chunk`` in both. ``prompt_tokens``: which prompt tokens get a row (default
    ``"user"``: the prompt's own tokens, no special or template tokens; see :func:`kept_positions`).
    In raw mode a given response is tokenized after ``prompt + separator`` (:func:`response_ids`)."""
    if chunk < 1:
        raise ShapeError(f"chunk must be >= 1, got {chunk}")
    choose("attribution mode", mode, MODES, ShapeError)
    text, start, p_ids, offsets, r_ids, E, targets = _setup(model, prompt, response, chat, max_new_tokens, separator)
    n_in, n_out = len(p_ids), len(r_ids)
    if (choose_mode(n_in, n_out) if mode == "auto" else mode) == "forward":
        a, o = _forward_scores(model, E, n_in, targets, chunk)
        scores, probs = a.double().cpu().numpy(), o.cpu().numpy()
    else:
        cols, os_ = [], []
        with torch.enable_grad():
            for s in range(0, n_out, chunk):
                a, o = _chunk_scores(model, E, n_in, s, targets[s: s + chunk])
                cols.append(a)
                os_.append(o)
        scores, probs = torch.cat(cols).T.double().cpu().numpy(), torch.cat(os_).cpu().numpy()
    return _result(model, prompt, text, start, p_ids, offsets, r_ids, scores, probs, prompt_tokens)


def attribute_loop(model: Model, prompt: str, response: str | None = None, chat: bool | None = None,
                   max_new_tokens: int = 32, prompt_tokens: str = "user", separator: str = SEPARATOR) -> Attribution:
    """The reference path of :func:`attribute`: one forward, then one backward per output token."""
    text, start, p_ids, offsets, r_ids, E, targets = _setup(model, prompt, response, chat, max_new_tokens, separator)
    n_in = len(p_ids)
    with torch.enable_grad():
        o = output_probs(model, E, n_in, targets)
        cols = []
        for j in range(len(r_ids)):
            (g,) = torch.autograd.grad(o[j], E, retain_graph=j + 1 < len(r_ids))
            cols.append((g[0, :n_in].float() * E[0, :n_in].detach().float()).sum(-1))
    scores = torch.stack(cols).T.double().cpu().numpy()
    return _result(model, prompt, text, start, p_ids, offsets, r_ids, scores, o.detach().cpu().numpy(),
                   prompt_tokens)
