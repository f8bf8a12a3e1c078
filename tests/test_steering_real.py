"""Integration: on the real default model, a toxicity vector fitted on training prompts detoxifies
held-out continuations and its negation toxifies them."""

import numpy as np
import pytest
import torch

from steerlab.data import contrast_from_scores, load_prompts, split
from steerlab.generation import GenConfig, generate
from steerlab.hooks import capture
from steerlab.scoring import get_scorer
from steerlab.steer import SteeringVector
from steerlab.steer.sweep import typical_norms


@pytest.mark.integration
def test_vector_detoxifies_held_out_prompts(real_model):
    m = real_model
    scorer = get_scorer("default")
    parts = split(load_prompts("rtp"), seed=0)
    train = [p.text for p in parts["train"]]
    cs = contrast_from_scores(train, scorer.toxicity(train), n=32)
    site = "blocks.18.resid_post"
    sv = SteeringVector.fit(m, cs.desirable, cs.undesirable, site, positions="last")
    test = [p.text for p in parts["test"][:24]]
    cfg = GenConfig(max_new_tokens=16, batch_size=24)
    norm = typical_norms(m, test, [site])[site]

    def mean_tox(alpha):
        if alpha == 0:
            conts = generate(m, test, cfg, progress=False)
        else:
            with sv.apply(m, alpha=alpha * norm):
                conts = generate(m, test, cfg, progress=False)
        return float(np.mean(scorer.toxicity([c[0] for c in conts])))

    base, detox, toxify = mean_tox(0.0), mean_tox(0.5), mean_tox(-0.5)
    print(f"mean toxicity: unsteered {base:.3f}, detox {detox:.3f}, toxify {toxify:.3f}")
    assert detox < base - 0.05, (base, detox)
    assert toxify > base + 0.1, (base, toxify)


@pytest.mark.integration
def test_mean_pooled_vector_is_dominated_by_the_first_token(real_model):
    """SmolLM2's first position holds an attention-sink state about 100x larger in norm than the
    others; a plain mean over tokens lets it dominate the fitted direction, the default
    (``mean_skip_first``) does not."""
    m = real_model
    scorer = get_scorer("default")
    train = [p.text for p in split(load_prompts("rtp"), seed=0)["train"]]
    cs = contrast_from_scores(train, scorer.toxicity(train), n=32)
    site = "blocks.12.resid_post"
    caps = capture(m, list(cs.desirable) + list(cs.undesirable), site, "all")
    a, lengths = caps[site], caps.mask.sum(1)
    T = a.shape[1]
    first = torch.stack([a[i, T - int(lengths[i])] for i in range(len(a))])  # each text's first token
    others = torch.cat([a[i, T - int(lengths[i]) + 1:] for i in range(len(a))])
    assert first.norm(dim=1).mean() > 20 * others.norm(dim=1).mean()
    f = first.mean(0)
    cos = {pos: float(torch.nn.functional.cosine_similarity(
        SteeringVector.fit(m, cs.desirable, cs.undesirable, site, positions=pos).directions[site], f, dim=0))
        for pos in ("mean", "mean_skip_first")}
    print("cosine with the mean first-token state:", cos)
    assert abs(cos["mean"]) > 0.5 and abs(cos["mean_skip_first"]) < 0.3, cos
