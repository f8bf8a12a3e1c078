"""Attention-head word pairs (Wu et al. att_explain, METHODS.md 2): data-free reading of each head's
query-key bilinear form on word embeddings.

For block ``l`` and head ``h``: ``H_q = (E * g) W_q^h^T`` and ``H_k = (E * g) W_k^h^T`` with ``E`` the
word embeddings (a word's embedding is the mean of its sub-token rows of the input embedding
matrix) and ``g`` the gain of the norm before attention folded in (the per-token normalisation,
RoPE, biases and any q/k norm's normalisation are ignored; a q/k norm's gain is folded in too).
Grouped-query heads use their shared key head. Dimensions ``r`` of a head are ordered by energy
``sum_w H_q[w,r]^2 + H_k[w,r]^2``; per dimension the top ``k`` words by ``|H_q[:,r]|`` and by
``|H_k[:,r]|`` form candidate pairs, kept when ``H_q * H_k > 0`` and the two words' similarity is
above both words' thresholds (mean + 1.96 std of the word's similarity to the ``n_frequent`` most
frequent words), then ranked by similarity as ``"key=query"``. Everything is batched over heads.

Similarity: ``"embeddings"`` (cosine of the model's own mean input embeddings, the default) or
``"minilm"`` (the bundled all-MiniLM-L6-v2 sentence model); results say which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EmptyInputError, SiteError
from ..models.adapters import get_module
from ..models.model import Model
from ..registry import choose
from ..validate import allocation


@dataclass
class HeadPairs:
    """Word pairs of every head of one layer: ``pairs[h]`` is a list of ``(key, query, similarity,
    dimension rank)`` sorted by similarity; ``energy`` ``[n_heads, d_head]`` is in energy order."""

    layer: int
    pairs: list[list[tuple[str, str, float, int]]]
    energy: np.ndarray
    similarity: str


def english_words(n: int = 5000) -> list[str]:
    """The ``n`` most frequent English words (wordfreq), letters only, in frequency order."""
    from wordfreq import top_n_list

    return [w for w in top_n_list("en", int(n * 1.3) + 50) if w.isalpha()][:n]


def word_embeddings(model: Model, words: Sequence[str]) -> torch.Tensor:
    """Mean of each word's sub-token rows (tokenised with a leading space) of the input embedding
    matrix, ``[N, d]`` float32 on the model's device."""
    rows = model.tok([" " + w for w in words], add_special_tokens=False)["input_ids"]
    if any(len(r) == 0 for r in rows):
        raise EmptyInputError("a word has no tokens: every word needs at least one character")
    flat = torch.tensor([t for r in rows for t in r], device=model.device)
    offsets = torch.tensor(np.cumsum([0] + [len(r) for r in rows[:-1]]), device=model.device)
    W = model.hf.get_input_embeddings().weight.detach().float()
    return F.embedding_bag(flat, W, offsets, mode="mean")


def norm_gain(norm: torch.nn.Module | None, size: int, device) -> torch.Tensor:
    """The elementwise gain of an RMSNorm / LayerNorm (Gemma's ``1 + w`` included), read by probing
    it with a zero-mean +-1 input; ones when there is no norm."""
    if norm is None:
        return torch.ones(size, device=device)
    x = torch.ones(size, device=device)
    x[1::2] = -1.0
    w = next(norm.parameters(), None)
    with torch.no_grad():
        x = x.to(w.dtype if w is not None else torch.float32)
        return ((norm(x[None]) - norm(-x[None]))[0].float() / (2 * x.float()))


def _child(mod: torch.nn.Module, name: str):
    return getattr(mod, name, None)


def qk_weights(model: Model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_q`` and ``W_k`` of every head of block ``layer``, ``[n_heads, d_head, d_model]`` each, with
    the pre-attention norm's gain (and q/k norms' gains) folded in and key heads repeated for
    grouped-query attention."""
    block = model.layer(layer)
    attn = get_module(block, model.arch.attn)
    H, Hkv, dh, d = model.n_heads, model.n_kv_heads, model.d_head, model.d_model
    if _child(attn, "q_proj") is not None and _child(attn, "k_proj") is not None:
        wq, wk = attn.q_proj.weight, attn.k_proj.weight
    elif _child(attn, "qkv_proj") is not None:
        w = attn.qkv_proj.weight
        wq, wk = w[: H * dh], w[H * dh: (H + Hkv) * dh]
    elif _child(attn, "query_key_value") is not None:
        w = attn.query_key_value.weight.reshape(H, 3 * dh, d)
        wq, wk = w[:, :dh].reshape(H * dh, d), w[:, dh: 2 * dh].reshape(H * dh, d)
    elif _child(attn, "c_attn") is not None:
        w = attn.c_attn.weight.T  # Conv1D stores [d, 3d]
        wq, wk = w[:d], w[d: 2 * d]
    else:
        raise SiteError(f"{model.name} block {layer}: no query/key projections found in {model.arch.attn!r} "
                        f"(looked for q_proj/k_proj, qkv_proj, query_key_value, c_attn)")
    wq = wq.detach().float().clone().reshape(H, dh, d)
    wk = wk.detach().float().clone().reshape(-1, dh, d)
    for name, mat in (("q_norm", "q"), ("k_norm", "k")):
        qn = _child(attn, name)
        if qn is not None:
            w = wq if mat == "q" else wk
            g = norm_gain(qn, next(qn.parameters()).shape[0], w.device).reshape(-1, dh)
            w.mul_(g[:, :, None])
    pre = _child(block, "input_layernorm")
    pre = pre if pre is not None else _child(block, "ln_1")
    g = norm_gain(pre, d, wq.device)
    wq, wk = wq * g, wk * g
    return wq, wk.repeat_interleave(H // wk.shape[0], dim=0)


def similarity_matrix(model: Model, words: Sequence[str], E: torch.Tensor, kind: str) -> torch.Tensor:
    """Cosine similarities ``[N, N]`` of the words: model embeddings or MiniLM."""
    if kind == "embeddings":
        X = E
    elif kind == "minilm":
        from ..metrics.text import sentence_encoder

        X = torch.as_tensor(sentence_encoder().encode(list(words), convert_to_numpy=True), device=E.device).float()
    else:
        choose("similarity", kind, ("embeddings", "minilm"))
    X = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return X @ X.T


def thresholds(S: torch.Tensor, n_frequent: int) -> torch.Tensor:
    """Per word: mean + 1.96 std of its similarity to the ``n_frequent`` first (most frequent)
    words, itself excluded."""
    M = min(n_frequent, S.shape[0])
    sub = S[:, :M].clone()
    idx = torch.arange(M, device=S.device)
    keep = torch.ones_like(sub, dtype=torch.bool)
    keep[idx, idx] = False
    cnt = keep.sum(1).clamp_min(2)
    mean = (sub * keep).sum(1) / cnt
    var = (((sub - mean[:, None]) ** 2) * keep).sum(1) / (cnt - 1)
    return mean + 1.96 * var.sqrt()


def head_pairs(Hq: torch.Tensor, Hk: torch.Tensor, S: torch.Tensor, thr: torch.Tensor, k: int,
               n_dims: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate pairs of all heads at once. ``Hq``/``Hk`` ``[H, N, dh]``. Returns the energy
    ``[H, dh]`` (descending), the pair mask ``[H, r, k, k]`` and the word indices ``(iq, ik)``."""
    energy = (Hq ** 2 + Hk ** 2).sum(1)  # [H, dh]
    order = energy.argsort(dim=1, descending=True)[:, :n_dims]
    q = Hq.gather(2, order[:, None].expand(-1, Hq.shape[1], -1)).transpose(1, 2)  # [H, r, N]
    kk = Hk.gather(2, order[:, None].expand(-1, Hk.shape[1], -1)).transpose(1, 2)
    k = min(k, q.shape[-1])
    iq, ik = q.abs().topk(k, dim=-1).indices, kk.abs().topk(k, dim=-1).indices  # [H, r, k]
    sq, sk = q.gather(-1, iq).sign(), kk.gather(-1, ik).sign()
    sim = S[iq[..., :, None], ik[..., None, :]]  # [H, r, k(query), k(key)]
    mask = (sq[..., :, None] * sk[..., None, :] > 0) & (sim > thr[iq][..., :, None]) & (sim > thr[ik][..., None, :])
    mask &= iq[..., :, None] != ik[..., None, :]
    return energy.gather(1, energy.argsort(dim=1, descending=True)), mask, torch.stack([iq, ik])


def _collect(mask, idx, S, words, max_pairs: int) -> list[list[tuple[str, str, float, int]]]:
    """Per head: unique key=query pairs, best similarity first, with the first dimension rank seen."""
    ht, rt, at, bt = mask.nonzero(as_tuple=True)
    qt, kt = idx[0][ht, rt, at], idx[1][ht, rt, bt]
    sims = S[qt, kt].cpu().numpy()
    h, r, qi, ki = (t.cpu().numpy() for t in (ht, rt, qt, kt))
    order = np.lexsort((r, -sims, h))  # by head, then similarity (descending), then dimension rank
    n = len(words)
    keys = (h[order].astype(np.int64) * n + ki[order]) * n + qi[order]
    _, first = np.unique(keys, return_index=True)
    sel = order[np.sort(first)]  # first occurrence of each (head, key, query), still in order
    hs = h[sel]
    starts = np.searchsorted(hs, hs, side="left")
    sel = sel[np.arange(sel.size) - starts < max_pairs]
    out: list[list[tuple[str, str, float, int]]] = [[] for _ in range(mask.shape[0])]
    for j in sel:
        out[h[j]].append((words[ki[j]], words[qi[j]], float(sims[j]), int(r[j])))
    return out


def explain_heads(model: Model, layers: Sequence[int] | None = None, n_words: int = 5000, k: int = 100,
                  n_frequent: int = 3000, similarity: str = "embeddings", n_dims: int | None = None,
                  max_pairs: int = 50, words: Sequence[str] | None = None) -> list[HeadPairs]:
    """Word pairs of every head of the given layers (all by default). ``words`` replaces the
    wordfreq vocabulary of ``n_words`` English words (frequency order matters for thresholds)."""
    words = list(words) if words is not None else english_words(n_words)
    if len(words) < 2:
        raise EmptyInputError(f"the head analysis needs at least 2 words, got {len(words)}")
    n = len(words)  # the similarity matrix and its thresholds: a few [N, N] float32 matrices
    allocation(3 * 4 * n * n, f"the word-similarity matrix of {n} words", "lower --words (n_words)")
    idx = range(model.n_layers) if layers is None else [model.site(f"blocks.{i}.attn.out").layer for i in layers]
    E = word_embeddings(model, words)
    S = similarity_matrix(model, words, E, similarity)
    thr = thresholds(S, n_frequent)
    out = []
    for layer in idx:
        wq, wk = qk_weights(model, layer)
        Hq, Hk = torch.einsum("nd,hrd->hnr", E, wq), torch.einsum("nd,hrd->hnr", E, wk)
        energy, mask, pidx = head_pairs(Hq, Hk, S, thr, k, n_dims)
        out.append(HeadPairs(layer, _collect(mask, pidx, S, words, max_pairs), energy.cpu().numpy(), similarity))
    return out
