"""Golden test: the paper's Tables 1 and 2 reproduced with steerlab's instruction score on the
authors' own saved attribution matrices (``../shared/data/wu2023_attributions`` beside the clone)."""

from pathlib import Path

import numpy as np
import pytest

from steerlab.errors import DataError
from steerlab.explain.attribution import importance_density, instruction_score
from steerlab.explain.wu2023 import instruction_mask, instruction_sentences, load_reference, reference_tables

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = [ROOT.parent / "shared" / "data" / "wu2023_attributions",
              ROOT.parent.parent / "shared" / "data" / "wu2023_attributions"]  # a worktree one level deeper
DATA = next((p for p in CANDIDATES if p.is_dir()), None)
needs_data = pytest.mark.skipif(DATA is None, reason="the authors' attributions are not beside the clone "
                                "(../shared/data/wu2023_attributions is absent)")


def compute_density_independent(q, eps=7, p=4):
    """The public utils.compute_density on an already quantised matrix, written out here."""
    x = np.where(q <= eps, 0.0, q)
    d = x.sum(-1) / ((x ** p).sum(-1) ** (1.0 / p) + 1e-9)
    return d / (1e-9 + d.max())


@needs_data
def test_tables_1_and_2_reproduced():
    t = reference_tables(DATA)
    t1, t2 = t["table1"], t["table2"]
    # Table 2: the tuned model's instruction score is higher than the base model's
    assert t2["n_a"] == t2["n_b"] == t["n_items"] == 158
    assert t2["mean_a"] > t2["mean_b"] and t2["p_one_sided"] < 0.01
    assert 1.2 < t2["mean_a"] < 1.45 and 0.95 < t2["mean_b"] < 1.2  # the paper's code: about 1.25 vs 1.02
    # Table 1: followed responses score higher than not followed ones (ratings >= 2 vs 1)
    assert t1["n_a"] + t1["n_b"] == 155 and t1["n_b"] == 31
    assert t1["mean_a"] > t1["mean_b"] and t1["p_one_sided"] < 0.01
    # without the per-prompt maximum the tuned-vs-base comparison reverses (the old score)
    raw = reference_tables(DATA, prompt_max=False)["table2"]
    assert raw["mean_a"] < raw["mean_b"] and raw["p_one_sided"] > 0.5


@needs_data
def test_density_matches_public_formula_and_masks_hit_instructions():
    rows = load_reference(DATA)
    for r in rows[::15]:
        for m in ("v", "l"):
            q = r[m]["q"]
            if q.shape[1] == 0:
                continue
            ours = importance_density(q, quantised=True)
            np.testing.assert_allclose(ours, compute_density_independent(q), atol=1e-6)
            mask = r[m]["mask"]
            ref = (compute_density_independent(q)[mask]).sum() / np.log2(2 + mask.size)
            assert instruction_score(ours, mask) == pytest.approx(ref, abs=1e-6)
    assert all(r["v"]["mask"].size > 0 and r["l"]["mask"].size > 0 for r in rows)


def test_instruction_sentences_and_mask():
    prompt = "Be brief. Rewrite the text below.\n\nInput: Cats sleep a lot.\n\nOutput:"
    sents = instruction_sentences(prompt, "Rewrite the text|||Input: &&&Cats sleep a lot.")
    # as in the public code, the empty part after "Input:" matches the first sentence too
    assert sents == ["Rewrite the text below.", "Be brief."]
    pieces = ["\u2581Be", "\u2581brief", ".", "\u2581Rew", "rite", "\u2581the", "\u2581text", "\u2581below", ".",
              "<0x0A>", "<0x0A>", "Input", ":"]
    assert instruction_mask(pieces, sents[:1]).tolist() == [3, 4, 5, 6, 7, 8]
    assert instruction_mask(pieces, sents).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert instruction_mask(pieces, ["not there"]).size == 0


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="lacks items.json"):
        load_reference(tmp_path)
