"""Metrics that run a language model: perplexity of texts or continuations (fluency), and the KL
divergence of an edited model's next-token distributions from the unedited model's on neutral
text (side effects), with a reference computed once (top-k compressed) and reused. Every forward
goes through :meth:`steerlab.Model.forward` (left padding, position ids, ``logits_to_keep``) under
whatever hooks or weight edits are active."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EmptyInputError, ShapeError
from ..models.model import Model


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of each text and of the whole set.

    ``nll[i]`` is the summed negative log-likelihood (nats) of text ``i``'s scored tokens,
    ``n_tokens[i]`` their number, ``per_text[i] = exp(nll[i] / n_tokens[i])`` (NaN when a text has
    no scored token). ``aggregate = exp(sum(nll) / sum(n_tokens))`` (token-weighted) and
    ``mean_per_text`` the mean of ``per_text`` (the per-generation average some papers report)."""

    per_text: np.ndarray
    nll: np.ndarray
    n_tokens: np.ndarray
    aggregate: float
    mean_per_text: float


# batch size of the passes over fixed text (perplexity, KL): the fastest of 8/16/32/64 on a quiet
# 2-core machine (benchmarks/bench_batch.py, 2026-12-07: 367 / 466 / 392 / 256 tokens/s)
FIXED_TEXT_BATCH = 16
# rows per target pass of shared_prefix_nlls (16, 32, 64 and 128 were within noise of each other, 2026-12-07)
TARGET_ROWS = 32


def _logits(model: Model, ids: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits ``[B, keep or T, V]`` (float32) of the last ``keep`` positions (all when None)."""
    logits = model.forward(ids, mask, logits_to_keep=keep).logits
    return (logits[:, -keep:] if keep else logits).float()


def _check_pairs(contexts: Sequence, targets: Sequence, batch_size: int, who: str) -> None:
    if len(contexts) != len(targets):
        raise ShapeError(f"{len(contexts)} contexts for {len(targets)} targets")
    if not contexts:
        raise EmptyInputError(f"{who} got no texts")
    if batch_size < 1:
        raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(c) == 0 for c in contexts):
        raise ShapeError("every context needs at least one token to condition on")


@torch.no_grad()
def token_nlls(
    model: Model,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int = FIXED_TEXT_BATCH,
) -> list[np.ndarray]:
    """Per-token negative log-likelihoods (nats) of ``targets[i]`` given ``contexts[i]`` (token
    ids; each context needs at least one token). Batches of similar length, left-padded with an
    attention mask and position ids counted from each row's first real token; only the logits of
    the target positions are computed (``logits_to_keep``) and pads never enter a sum."""
    _check_pairs(contexts, targets, batch_size, "token_nlls")
    seqs = [list(c) + list(t) for c, t in zip(contexts, targets, strict=True)]
    ids_all, mask_all = model.pad(seqs)
    out: list[np.ndarray] = [np.zeros(0)] * len(contexts)
    for rows, cols in model.batches(mask_all, batch_size):
        rows_l = rows.tolist()
        t_len = [len(targets[i]) for i in rows_l]
        K = max(t_len)
        if K == 0:
            continue
        ids, mask = ids_all[rows, cols], mask_all[rows, cols]
        logits = _logits(model, ids, mask, keep=K + 1)[:, :-1]   # predicts columns T-K..T-1
        tgt = ids[:, -K:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                              reduction="none").view(len(rows_l), K)
        nll = nll.double().cpu().numpy()
        for j, i in enumerate(rows_l):
            out[i] = nll[j, K - t_len[j]:]
    return out


@torch.no_grad()
def shared_prefix_nlls(
    model: Model,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int = FIXED_TEXT_BATCH,
) -> list[np.ndarray]:
    """:func:`token_nlls` with each distinct context forwarded once: its KV cache (and the logits at
    its last token, which predict the first target token) serve every target that follows it, as
    the k samples of a prompt or the candidate settings of a grid do (a repeated context + target pair,
    as when a gentle edit leaves a sample unchanged, is scored once). Contexts go in batches of
    similar length (left-padded), their targets in right-padded batches of :data:`TARGET_ROWS` rows
    on a copy of the cache (position ids continue each row's own context). Two forward calls per
    target: for the unedited model only (an edit that acts on the last position of each call would
    act twice). Equal to :func:`token_nlls` within float32 rounding (tests)."""
    from ..models.model import cache_of, cache_rows, position_ids

    _check_pairs(contexts, targets, batch_size, "shared_prefix_nlls")
    index: dict[tuple[int, ...], int] = {}
    of = [index.setdefault(tuple(c), len(index)) for c in contexts]
    followers: list[list[int]] = [[] for _ in index]
    once: dict[tuple, int] = {}  # a repeated (context, target) pair is scored once
    for i, u in enumerate(of):
        if len(targets[i]) and once.setdefault((u, tuple(targets[i])), i) == i:
            followers[u].append(i)
    out: list[np.ndarray] = [np.zeros(0)] * len(contexts)
    ids_all, mask_all = model.pad(list(index))
    pos_kw = model.accepts("position_ids")
    for urows, cols in model.batches(mask_all, batch_size):
        todo = [(j, i) for j, u in enumerate(urows.tolist()) for i in followers[u]]
        if not todo:
            continue
        ids, mask = ids_all[urows, cols], mask_all[urows, cols]
        kw = {"position_ids": position_ids(mask)} if pos_kw else {}
        if model.accepts("logits_to_keep"):
            kw["logits_to_keep"] = 1
        first = model.hf(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        cache, last = cache_of(first), first.logits[:, -1].float()
        for part in range(0, len(todo), TARGET_ROWS):
            chunk = todo[part: part + TARGET_ROWS]
            sel = torch.tensor([j for j, _ in chunk], device=ids.device)
            lens = [len(targets[i]) for _, i in chunk]
            T = max(lens)
            tgt = torch.full((len(chunk), T), model.pad_id, dtype=torch.long)
            tmask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, (_, i) in enumerate(chunk):
                tgt[r, : lens[r]] = torch.as_tensor(list(targets[i]), dtype=torch.long)
                tmask[r, : lens[r]] = 1
            tgt, tmask = tgt.to(ids.device), tmask.to(ids.device)
            kw = {"position_ids": mask[sel].sum(-1, keepdim=True) + torch.arange(T, device=ids.device)} if pos_kw else {}
            kw["cache" if model.accepts("cache") else "past_key_values"] = cache_rows(cache, sel)
            more = model.hf(input_ids=tgt, attention_mask=torch.cat([mask[sel], tmask], 1), use_cache=True, **kw)
            logits = torch.cat([last[sel, None], more.logits[:, :-1].float()], 1)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            nll = nll.view(len(chunk), T).double().cpu().numpy()
            for r, (_, i) in enumerate(chunk):
                out[i] = nll[r, : lens[r]]
    for i, u in enumerate(of):
        if len(targets[i]):
            out[i] = out[once[(u, tuple(targets[i]))]]
    return out


def perplexity(
    model: Model,
    texts: Sequence[str],
    prompts: Sequence[str] | None = None,
    batch_size: int = FIXED_TEXT_BATCH,
    chat: bool = False,
    shared_prefix: bool = False,
) -> Perplexity:
    """Perplexity of ``texts`` under ``model`` (the reference model: unedited for fluency, or
    edited for side effects on neutral text).

    Without ``prompts`` each text is scored on its own: tokenized with the tokenizer's special
    tokens (BOS when it adds one), every token after the first is scored, as a plain
    ``model(ids, labels=ids)`` loss does. With ``prompts`` (aligned with ``texts``) each text is a
    continuation: the prompt is tokenized with special tokens (rendered as a user turn with the
    chat template when ``chat=True``), the continuation without, and only the continuation's
    tokens are scored, conditioned on the prompt. Token NLLs come from :func:`token_nlls`, or with
    ``shared_prefix`` (for the unedited model) from :func:`shared_prefix_nlls`, which forwards each
    distinct prompt once for all the continuations that follow it."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EmptyInputError("perplexity got no texts")
    tok = model.tok
    if prompts is None:
        full = tok(texts, add_special_tokens=True)["input_ids"]
        ctx = [ids[:1] for ids in full]
        tgt = [ids[1:] for ids in full]
    else:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(texts):
            raise ShapeError(f"{len(prompts)} prompts for {len(texts)} texts")
        rendered = [model.chat_text(p) for p in prompts] if chat else prompts
        ctx = [list(c) for c in tok(rendered, add_special_tokens=not chat)["input_ids"]]
        tgt = [list(t) for t in tok(texts, add_special_tokens=False)["input_ids"]]
        for i, c in enumerate(ctx):
            if not c:  # empty prompt and no BOS: condition the continuation on its first token
                ctx[i], tgt[i] = tgt[i][:1], tgt[i][1:]
    keep = [i for i, c in enumerate(ctx) if c]
    nlls: list[np.ndarray] = [np.zeros(0)] * len(texts)
    if keep:
        nlls_of = shared_prefix_nlls if shared_prefix and prompts is not None else token_nlls
        for i, v in zip(keep, nlls_of(model, [ctx[i] for i in keep], [tgt[i] for i in keep], batch_size),
                        strict=True):
            nlls[i] = v
    nll = np.array([v.sum() for v in nlls])
    n = np.array([v.size for v in nlls])
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(n > 0, np.exp(nll / np.maximum(n, 1)), np.nan)
    total = n.sum()
    agg = float(np.exp(nll.sum() / total)) if total else float("nan")
    mean_per = float(np.nanmean(per)) if (n > 0).any() else float("nan")
    return Perplexity(per, nll, n, agg, mean_per)


# --- KL divergence from a reference ------------------------------------------------------------


@dataclass
class NextTokenLogprobs:
    """Next-token log-probabilities of a model at every real (non-pad) position of a text set,
    on the CPU, the positions of text ``i`` in rows ``offsets[i]:offsets[i+1]``.

    Full (``indices is None``): ``values`` is ``[P, V]``. Top-k: ``values`` ``[P, k]`` holds the
    ``k`` largest log-probabilities, ``indices`` their token ids and ``tail`` ``[P]`` the log of the
    remaining mass. ``token_ids`` ``[P]`` are the input tokens (to check that a comparison uses the
    same texts and tokenizer)."""

    values: torch.Tensor
    indices: torch.Tensor | None
    tail: torch.Tensor | None
    offsets: torch.Tensor
    token_ids: torch.Tensor

    @property
    def n_texts(self) -> int:
        return len(self.offsets) - 1

    def head(self, n: int) -> NextTokenLogprobs:
        """The reference of the first ``n`` texts only (a view: no forward pass)."""
        if not 0 < n <= self.n_texts:
            raise EmptyInputError(f"head({n}) of a reference over {self.n_texts} texts")
        end = int(self.offsets[n])
        cut = lambda t: None if t is None else t[:end]  # noqa: E731
        return NextTokenLogprobs(self.values[:end], cut(self.indices), cut(self.tail), self.offsets[: n + 1],
                                 self.token_ids[:end])

    @property
    def coverage(self) -> float:
        """Mean probability mass held by the stored tokens (1 for full distributions)."""
        if self.tail is None:
            return 1.0
        return float((-torch.expm1(self.tail.double())).mean())


@dataclass(frozen=True)
class KLResult:
    """KL divergence ``KL(P_ref || P_model)`` of next-token distributions: ``mean`` over all real
    positions of all texts, ``per_text`` the mean over each text's positions, ``n_positions`` their
    counts, ``coverage`` the reference mass the comparison saw exactly (1 unless top-k).
    The same pass reads the compared model's own negative log-likelihood of each text (``nll``: the
    summed NLL in nats of every token after the first, as :func:`perplexity` scores a text on its
    own); ``perplexity`` is their aggregate, so side effects need one forward, not two."""

    mean: float
    per_text: np.ndarray
    n_positions: np.ndarray
    coverage: float
    nll: np.ndarray | None = None

    @property
    def perplexity(self) -> float:
        """The compared model's perplexity of the texts (every token after each text's first)."""
        if self.nll is None:
            raise ValueError("this KL result holds no likelihoods")
        scored = int(np.maximum(self.n_positions - 1, 0).sum())
        return float(np.exp(self.nll.sum() / scored)) if scored else float("nan")


def kl_divergence(ref_logprobs: torch.Tensor, new_logprobs: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` over the last axis, from log-probabilities
    ``[..., V]``; terms with ``p(v) = 0`` count 0; positions where ``mask`` is 0 give 0."""
    if ref_logprobs.shape != new_logprobs.shape:
        raise ShapeError(f"log-prob shapes differ: {tuple(ref_logprobs.shape)} vs {tuple(new_logprobs.shape)}")
    p = ref_logprobs.exp()
    kl = torch.where(p > 0, p * (ref_logprobs - new_logprobs), torch.zeros_like(p)).sum(-1)
    return kl if mask is None else torch.where(mask.bool(), kl, torch.zeros_like(kl))


def _tail_logmass(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``indices`` (``[P, k]``) of ``logprobs`` ``[P, V]``."""
    return logprobs.scatter(-1, indices, float("-inf")).logsumexp(-1)


def topk_kl(ref_values: torch.Tensor, ref_indices: torch.Tensor, ref_tail: torch.Tensor,
            new_logprobs: torch.Tensor) -> torch.Tensor:
    """KL between the coarse-grained distributions over {the reference's top-k tokens, everything
    else}: ``sum_{v in K} p(v) log(p(v)/q(v)) + p(tail) log(p(tail)/q(tail))``. It never exceeds the
    full KL (data-processing inequality) and equals it when the reference's tail mass is 0."""
    q = new_logprobs.gather(-1, ref_indices)
    q_tail = _tail_logmass(new_logprobs, ref_indices)
    head = torch.cat([ref_values, ref_tail[:, None]], -1)
    new = torch.cat([q, q_tail[:, None]], -1)
    return kl_divergence(head, new)


def _position_logprobs(model: Model, texts: Sequence[str], batch_size: int
                       ) -> Iterator[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]]:
    """Per batch: text indices, each text's log-probs ``[n_i, V]`` (float32, model device) and its
    input token ids, at every real position."""
    enc = model.encode(texts)
    ids_all, mask_all = enc["input_ids"], enc["attention_mask"]
    for rows, cols in model.batches(mask_all, batch_size):
        mask, ids = mask_all[rows, cols], ids_all[rows, cols]
        lp = _logits(model, ids, mask).log_softmax(-1)
        real = mask.bool()
        yield rows.tolist(), [lp[j][real[j]] for j in range(len(rows))], [ids[j][real[j]] for j in range(len(rows))]


@torch.no_grad()
def next_token_logprobs(model: Model, texts: Sequence[str], top_k: int | None = 256,
                        batch_size: int = FIXED_TEXT_BATCH) -> NextTokenLogprobs:
    """Next-token log-probabilities of ``model`` (with whatever hooks or weight edits are active)
    at every real position of ``texts``, to serve as the reference of :func:`kl_from_reference`.

    The full distributions of a few hundred texts over a 49k vocabulary would take gigabytes, so
    by default only the top ``top_k`` log-probabilities per position and the log of the rest's
    mass are kept (``[positions, k]``); ``top_k=None`` keeps everything (exact, for small sets)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EmptyInputError("next_token_logprobs got no texts")
    if top_k is not None and top_k < 1:
        raise ShapeError(f"top_k must be >= 1 or None, got {top_k}")
    vals: list = [None] * len(texts)
    idxs: list = [None] * len(texts)
    tails: list = [None] * len(texts)
    toks: list = [None] * len(texts)
    for rows, lps, ids in _position_logprobs(model, texts, batch_size):
        for i, lp, t in zip(rows, lps, ids, strict=True):
            toks[i] = t.cpu()
            if top_k is None or top_k >= lp.shape[-1]:
                vals[i] = lp.cpu()
            else:
                top = lp.topk(top_k, dim=-1)
                vals[i], idxs[i] = top.values.cpu(), top.indices.to(torch.int32).cpu()
                tails[i] = _tail_logmass(lp, top.indices).cpu()
    counts = torch.tensor([len(t) for t in toks])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    topk = idxs[0] is not None
    return NextTokenLogprobs(torch.cat(vals), torch.cat(idxs) if topk else None,
                             torch.cat(tails) if topk else None, offsets, torch.cat(toks))


@torch.no_grad()
def kl_from_reference(
    model: Model,
    reference: NextTokenLogprobs | Model,
    texts: Sequence[str],
    batch_size: int = FIXED_TEXT_BATCH,
) -> KLResult:
    """``KL(P_ref || P_model)`` of next-token distributions at every real position of ``texts``
    (neutral text, for side effects), averaged over positions.

    ``reference`` is either a :class:`NextTokenLogprobs` from :func:`next_token_logprobs` on the
    same texts (compute it once with the unedited model, then compare many edited variants; a
    top-k reference gives :func:`topk_kl`, a full one the exact KL), or a second :class:`Model`
    (an unedited copy), run batch by batch beside ``model`` for the exact KL without storing
    distributions. Passing the same ``Model`` object as both compares it with itself (0)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise EmptyInputError("kl_from_reference got no texts")
    per_text = np.zeros(len(texts))
    nll = np.zeros(len(texts))
    n_pos = np.zeros(len(texts), dtype=np.int64)
    if isinstance(reference, Model):
        ref_iter = _position_logprobs(reference, texts, batch_size)
    else:
        if reference.n_texts != len(texts):
            raise ShapeError(f"the reference holds {reference.n_texts} texts, got {len(texts)}")
        ref_iter = None
    covered = 0.0
    for rows, lps, ids in _position_logprobs(model, texts, batch_size):
        ref_batch = next(ref_iter) if ref_iter is not None else None
        for j, (i, lp, t) in enumerate(zip(rows, lps, ids, strict=True)):
            if ref_batch is not None:
                ref_lp, ref_ids = ref_batch[1][j].to(lp.device), ref_batch[2][j].to(t.device)
                _check_same(ref_ids, t, i)
                kl = kl_divergence(ref_lp, lp)
                covered += len(t)
            else:
                a, b = int(reference.offsets[i]), int(reference.offsets[i + 1])
                _check_same(reference.token_ids[a:b].to(t.device), t, i)
                vals = reference.values[a:b].to(lp.device)
                if reference.indices is None:
                    kl = kl_divergence(vals, lp)
                    covered += len(t)
                else:
                    tail = reference.tail[a:b].to(lp.device)
                    kl = topk_kl(vals, reference.indices[a:b].to(lp.device).long(), tail, lp)
                    covered += float((-torch.expm1(tail.double())).sum())
            per_text[i] = float(kl.double().mean()) if len(t) else float("nan")
            n_pos[i] = len(t)
            # the text's own likelihood from the same log-probs: position p predicts token p + 1
            nll[i] = -float(lp[:-1].gather(1, t[1:, None].long()).double().sum())
    total = int(n_pos.sum())
    mean = float(np.nansum(per_text * n_pos) / total) if total else float("nan")
    return KLResult(mean, per_text, n_pos, covered / total if total else float("nan"), nll)


def _check_same(ref_ids: torch.Tensor, ids: torch.Tensor, i: int) -> None:
    if ref_ids.shape != ids.shape or not torch.equal(ref_ids, ids):
        raise ShapeError(f"text {i} tokenizes differently for the reference ({len(ref_ids)} tokens) and the "
                         f"model ({len(ids)} tokens): compare on the same texts with the same tokenizer")
