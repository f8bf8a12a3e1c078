"""Integration: on the real default model, a toxicity vector fitted on training prompts detoxifies
held-out continuations and its negation toxifies them."""

import numpy as np
import pytest

from steerlab.data import contrast_from_scores, load_prompts, split
from steerlab.generation import GenConfig, generate
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
    sv = SteeringVector.fit(m, cs.desirable, cs.undesirable, site, positions="mean")
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
