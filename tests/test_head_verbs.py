"""The paper's head-verb statistic: vocabulary coverage, per-verb shares by hand, the per-group tests."""

import numpy as np
import pytest
from scipy import stats

from steerlab.errors import EmptyInputError
from steerlab.explain.head_verbs import (
    INSTRUCTION_VERBS,
    background_verbs,
    head_vocabulary,
    layer_group,
    verb_shares,
    verb_tests,
)
from steerlab.explain.heads import HeadPairs, english_words


def test_vocabulary_holds_every_instruction_and_background_verb():
    bg = background_verbs(3000)
    assert len(bg) == 3000 and not set(bg) & set(INSTRUCTION_VERBS)
    assert bg[:5] == ["get", "know", "see", "think", "want"]  # most frequent first ("make" is an instruction verb)
    words = head_vocabulary(3000, INSTRUCTION_VERBS + tuple(bg))
    assert set(INSTRUCTION_VERBS) <= set(words) and set(bg) <= set(words)
    for v in ("summarize", "translate", "generate", "classify", "rewrite", "compare"):  # absent from the top 3000
        assert v not in english_words(3000) and v in words
    assert words[:3000] == english_words(3000)  # the frequency order the thresholds use is kept
    assert len(words) == len(set(words))


def _heads(layer, per_head):
    """HeadPairs of one layer; ``per_head`` lists each head's words, paired two by two."""
    pairs = [[(ws[i], ws[i + 1], 0.5, 0) for i in range(0, len(ws) - 1, 2)] for ws in per_head]
    return HeadPairs(layer, pairs, np.zeros((len(per_head), 1)), "embeddings")


def test_shares_match_a_hand_count_with_matched_heads():
    base = [_heads(0, [["write", "pen"], ["go", "run"]]), _heads(1, [["write", "write"], ["go", "x"]])]
    tuned = [_heads(0, [["write", "write"], ["go", "write"]]), _heads(1, [["y", "z"], ["go", "go"]])]
    rows, matched = verb_shares(base, tuned, 2, 2, ["write"], ["go", "run"], n_groups=1)
    assert matched
    by = {r["verb"]: r for r in rows}
    # write: heads (0,0) 2 > 1, (0,1) 1 > 0, (1,0) 0 < 2, (1,1) 0 = 0 (tie, left out): 2 of 3
    assert by["write"]["share_tuned_gt_base"] == pytest.approx(2 / 3) and by["write"]["n_untied"] == 3
    # go: (0,0) 0=0, (0,1) 1=1, (1,0) 0=0, (1,1) 2 > 1: 1 of 1; run: (0,1) 0 < 1: 0 of 1
    assert by["go"]["share_tuned_gt_base"] == 1.0 and by["run"]["share_tuned_gt_base"] == 0.0
    assert by["write"]["kind"] == "instruction" and by["go"]["kind"] == "background"


def test_unmatched_heads_compare_every_pair_of_the_group():
    base = [_heads(0, [["write", "a"], ["b", "c"]])]  # counts of write: 1, 0
    tuned = [_heads(0, [["write", "write"]]), _heads(1, [["d", "e"]]), _heads(2, [["write", "f"]])]  # 2, 0, 1
    rows, matched = verb_shares(base, tuned, 1, 3, ["write"], [], n_groups=1)
    assert not matched
    # pairs (t, b): (2,1) > (2,0) > (0,1) < (0,0) = (1,1) = (1,0) >: 3 greater, 1 smaller
    assert rows[0]["share_tuned_gt_base"] == 0.75 and rows[0]["n_untied"] == 4


def test_group_tests_are_two_sided_welch():
    rows = [{"layer_group": "0-50%", "verb": f"i{k}", "kind": "instruction", "share_tuned_gt_base": s}
            for k, s in enumerate([0.9, 0.8, 0.7])]
    rows += [{"layer_group": "0-50%", "verb": f"b{k}", "kind": "background", "share_tuned_gt_base": s}
             for k, s in enumerate([0.5, 0.4, 0.6, 0.5])]
    t = verb_tests(rows)["0-50%"]
    ref = stats.ttest_ind([0.9, 0.8, 0.7], [0.5, 0.4, 0.6, 0.5], equal_var=False)
    assert t["t"] == pytest.approx(ref.statistic) and t["p_two_sided"] == pytest.approx(ref.pvalue)
    assert "error" in verb_tests(rows[:1] + rows[3:])["0-50%"]
    with pytest.raises(EmptyInputError, match="nothing to test"):
        verb_tests([])
    assert [layer_group(i, 32, 8) for i in (0, 3, 4, 31)] == ["0-12%", "0-12%", "12-25%", "87-100%"]


def test_paper_sizes_preset():
    from steerlab.experiments.instruction_shift import ShiftConfig

    cfg = ShiftConfig.paper(data="x")
    assert (cfg.n_pcs, cfg.n_groups, cfg.label_seeds, cfg.data) == (300, 8, 5, "x")
    assert (ShiftConfig().n_pcs, ShiftConfig().n_groups) == (10, 4)
