"""Integration: on the real default model, each detoxification method moves the quantity it is built
to move, in the detox direction and by a minimum size, on held-out data (issue 31):

- ITI and SLIM lower their own probes' toxic logits on held-out toxic prompts;
- EigenShift shrinks the toxic-minus-non-toxic difference of the logits along the dampened singular
  directions on held-out states, and lowers the log-probabilities of the tokens those directions
  promote at held-out toxic states;
- AurA lowers its experts' responses on toxic text more than on non-toxic text;
- a steering vector raises the projection on its direction (downstream of the edited layer).

The sizes measured are printed (``pytest -s``) and quoted in docs/detox_methods.md and
docs/probes_iti_slim.md."""

import numpy as np
import pytest
import torch

from steerlab.data import contrast_from_scores, load_prompts, split
from steerlab.explain.probes import labelled_from_texts, probe_data, probe_heads
from steerlab.hooks import capture
from steerlab.scoring import get_scorer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(real_model):
    """The rtp split scored once: a contrast set of training prompts (the 48 most and 48 least toxic),
    and the 24 most / least toxic test prompts (held out from every fit)."""
    sc = get_scorer("default")
    parts = split(load_prompts("rtp"), seed=0)
    train = [p.text for p in parts["train"]]
    cs = contrast_from_scores(train, sc.toxicity(train), n=48)
    test = [p.text for p in parts["test"]]
    order = np.argsort(-np.asarray(sc.toxicity(test)), kind="stable")
    return {"contrast": cs, "toxic_test": [test[i] for i in order[:24]],
            "nontoxic_test": [test[i] for i in order[::-1][:24]], "train": train, "scorer": sc}


@pytest.fixture(scope="module")
def heads_data(real_model, data):
    """Last-token head activations of the contrast set, split 70/30 by prompt (as the benchmark does)."""
    cs = data["contrast"]
    lab = labelled_from_texts(list(cs.undesirable) + list(cs.desirable),
                              [1] * len(cs.undesirable) + [0] * len(cs.desirable), seed=0)
    return probe_data(real_model, lab, resid=False)


def _mean_head_logits(m, texts, heads, w, b, iv=None, **options):
    """``[len(heads)]``: each head's probe logit ``a . w + b`` at the last token, averaged over ``texts``,
    read with ``iv`` applied (its edit of the same site comes first) or without."""
    sites = sorted({f"blocks.{layer}.attn.heads" for layer, _ in heads})
    if iv is None:
        caps = capture(m, texts, sites, "last")
    else:
        with iv.apply(m, **options):
            caps = capture(m, texts, sites, "last")
    return torch.stack([(caps[f"blocks.{layer}.attn.heads"][:, h] @ w[j] + b[j]).mean()
                        for j, (layer, h) in enumerate(heads)])


def test_iti_lowers_its_probes_toxic_logits_on_held_out_toxic_prompts(real_model, data, heads_data):
    from steerlab.steer.iti import ITI

    m, pd = real_model, heads_data
    iti = ITI.fit(m, pd, k=16)
    res = probe_heads(pd)
    heads = iti.heads
    w = torch.stack([res.w[pd.layers.index(layer), h] for layer, h in heads])
    b = torch.stack([res.b[pd.layers.index(layer), h] for layer, h in heads])
    before = _mean_head_logits(m, data["toxic_test"], heads, w, b)
    after = _mean_head_logits(m, data["toxic_test"], heads, w, b, iti, alpha=5.0)
    print(f"ITI alpha 5: mean toxic logit of its 16 probes on held-out toxic prompts {before.mean():.2f} -> "
          f"{after.mean():.2f}; per head change {(after - before).min():.1f}..{(after - before).max():.1f}")
    assert before.mean() > 0  # the probes call the held-out toxic prompts toxic
    assert bool(((after - before) < -5).all()), (after - before)
    assert after.mean() < -5


def test_slim_lowers_its_probes_toxic_logits_on_held_out_toxic_prompts(real_model, data, heads_data):
    from steerlab.steer.slim import SLIM

    m = real_model
    slim = SLIM.fit(m, heads_data)
    p, H = slim.params, m.n_heads
    heads = [(slim.layer, h) for h in range(H)]
    before = _mean_head_logits(m, data["toxic_test"], heads, p["w"], p["b0"])
    change = {k: _mean_head_logits(m, data["toxic_test"], heads, p["w"], p["b0"], slim, kappa=k) - before
              for k in (1.0, 5.0)}
    print(f"SLIM layer {slim.layer} tau {slim.tau}: mean risk-probe logit on held-out toxic prompts "
          f"{before.mean():.2f}; change at kappa 1 {change[1.0].mean():.2f}, kappa 5 {change[5.0].mean():.2f}; "
          f"layer selection {slim.meta.get('layer_selection')}")
    assert before.mean() > 0
    assert change[1.0].mean() < -0.5
    assert change[5.0].mean() < 4 * change[1.0].mean()  # the step grows with kappa
    assert bool((change[5.0] <= 1e-4).all())  # no head is pushed towards toxic


def _teacher_forced_states(m, texts, table):
    """``final`` states of ``texts`` read in one teacher-forced pass, split by what comes next: the
    states followed by a toxic-lexicon token (score >= 0.5), with that token, and the other states."""
    side = m.tok.padding_side
    m.tok.padding_side = "left"
    try:
        enc = m.tok(list(texts), return_tensors="pt", padding=True).to(m.device)
    finally:
        m.tok.padding_side = side
    h = capture(m, dict(enc), "final", "all")["final"][:, :-1].float()
    nxt, ok = enc["input_ids"][:, 1:], (enc["attention_mask"][:, 1:] * enc["attention_mask"][:, :-1]).bool()
    hit = (table[nxt] >= 0.5) & ok
    return h[hit], nxt[hit], h[ok & ~hit]


@pytest.fixture(scope="module")
def toxic_states(real_model, data):
    """EigenShift-style states without sampling (a generation pass costs minutes here): ``final``
    states that produce a toxic-lexicon token in the contrast set's toxic prompts (fitting) or in the
    held-out toxic test prompts, and states of the non-toxic prompts (every third position)."""
    from steerlab.scoring import token_lexicon

    m = real_model
    ids, scores = token_lexicon(m, "default")
    table = torch.zeros(m.vocab_size, device=m.device)
    table[torch.as_tensor(ids, device=m.device)] = torch.as_tensor(scores, dtype=torch.float32, device=m.device)
    cs = data["contrast"]
    fit_t, _, _ = _teacher_forced_states(m, cs.undesirable, table)
    _, _, fit_n = _teacher_forced_states(m, cs.desirable, table)
    held_t, held_tok, _ = _teacher_forced_states(m, data["toxic_test"], table)
    _, _, held_n = _teacher_forced_states(m, data["nontoxic_test"], table)
    return (fit_t, fit_n[::3]), (held_t, held_tok, held_n[::3])


def test_eigenshift_shrinks_the_toxic_difference_and_the_tokens_it_promotes(real_model, toxic_states):
    from steerlab.steer.eigenshift import EigenShift, svd

    m = real_model
    (tf, nf), (th, tok, nh) = toxic_states
    es = EigenShift.fit(m, (tf, nf), k=8, alpha=0.0, rank="t", min_states=4)
    idx = es.indices
    dec = svd(m.W_U)
    A = dec.A[:, idx]  # [vocab, k] left singular vectors of the dampened directions
    head = m.unembed_module

    def logits(h, edited):
        with torch.no_grad():
            if not edited:
                return head(h.to(head.weight.dtype)).float()
            with es.apply(m):
                return head(h.to(head.weight.dtype)).float()

    sign = torch.sign(es.delta[idx])
    diff = {e: sign * ((logits(th, e) @ A).mean(0) - (logits(nh, e) @ A).mean(0)) for e in (False, True)}
    # the tokens the dampened directions promote at toxic states: largest A diag(s) delta
    promote = (A * dec.s[idx] * es.delta[idx].to(A)).sum(1).topk(50).indices
    gap = {e: logits(th, e)[:, promote].mean() - logits(nh, e)[:, promote].mean() for e in (False, True)}
    lp = {e: torch.log_softmax(logits(th, e), -1).gather(1, tok[:, None]).mean() for e in (False, True)}
    print(f"EigenShift k=8 alpha 0 rank t ({len(tf)} toxic + {len(nf)} non-toxic fitting states, {len(th)} + "
          f"{len(nh)} held out): signed toxic-minus-non-toxic logit projection on the dampened directions "
          f"{diff[False].sum():.2f} -> {diff[True].sum():.2f}; toxic-minus-non-toxic logit of the 50 tokens they "
          f"promote {gap[False]:.2f} -> {gap[True]:.2f}; log-prob of the toxic tokens that follow "
          f"{lp[False]:.2f} -> {lp[True]:.2f}")
    assert diff[False].sum() > 1.0  # the fitted differences hold on held-out states
    assert abs(float(diff[True].sum())) < 0.05 * float(diff[False].sum())
    assert gap[True] < gap[False] - 0.5
    assert lp[True] < lp[False]


def test_aura_lowers_its_experts_on_toxic_text_more_than_on_non_toxic(real_model, data):
    from steerlab.steer.aura import AurA

    m = real_model
    cs = data["contrast"]
    aura = AurA.fit(m, (list(cs.desirable), list(cs.undesirable)), variant="det0")
    sites = aura.sites
    units = {s: (aura.factors[s] < 1).nonzero().flatten() for s in sites}

    def responses(texts, edited):
        if not edited:
            caps = capture(m, texts, sites, "max")
        else:
            with aura.apply(m):
                caps = capture(m, texts, sites, "max")
        return torch.cat([caps[s][:, units[s]] for s in sites], 1).mean(0)  # [experts]

    drop = {k: responses(data[k], False) - responses(data[k], True) for k in ("toxic_test", "nontoxic_test")}
    gap = drop["toxic_test"] - drop["nontoxic_test"]
    print(f"AurA det0 ({int(sum(len(u) for u in units.values()))} experts): mean drop of their max response on "
          f"held-out toxic prompts {drop['toxic_test'].mean():.3f}, on non-toxic {drop['nontoxic_test'].mean():.3f}; "
          f"toxic drop larger for {float((gap > 0).float().mean()):.0%} of the experts")
    null = aura.meta["null"]
    print(f"AurA units with AUROC >= 0.7: {null['real']['units_auroc_ge_0.7']} (label-shuffled null: "
          f"{null['shuffled_labels']['units_auroc_ge_0.7']}); proportional mean factor {null['real']['mean_factor']} "
          f"(null {null['shuffled_labels']['mean_factor']})")
    assert null["exceeds_noise"]
    assert drop["toxic_test"].mean() > 1.2 * drop["nontoxic_test"].mean()
    assert float((gap > 0).float().mean()) > 0.6


def test_steering_raises_the_projection_on_its_direction_downstream(real_model, data):
    from steerlab.steer import SteeringVector
    from steerlab.steer.sweep import typical_norms

    m = real_model
    cs = data["contrast"]
    sites = ["blocks.12.resid_post", "blocks.20.resid_post"]
    sv = SteeringVector.fit(m, cs.desirable, cs.undesirable, sites)
    u = sv.directions[sites[1]].to(m.device).float()
    u = u / u.norm()
    norm = typical_norms(m, data["toxic_test"], sites[:1])[sites[0]]

    def proj(alpha):
        if alpha == 0:
            caps = capture(m, data["toxic_test"], sites[1], "last")
        else:
            with sv.apply(m, alpha=alpha * norm, sites=sites[:1]):
                caps = capture(m, data["toxic_test"], sites[1], "last")
        return float((caps[sites[1]].float() @ u).mean())

    base, half = proj(0.0), proj(0.5)
    scale = float(capture(m, data["toxic_test"], sites[1], "last")[sites[1]].float().norm(dim=-1).mean())
    print(f"steering at layer 12 (0.5 x its typical norm): projection of layer 20 on its own desirable "
          f"direction {base:.2f} -> {half:.2f} (state norm {scale:.1f})")
    assert half > base + 0.05 * scale
