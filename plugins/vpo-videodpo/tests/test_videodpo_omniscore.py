"""OmniScore, re-weighting and the omniscore selector against hand-computed values."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from vpo_core import Pair, VpoError
from vpo_videodpo import (OmniScore, OmniScoreConfig, OmniScoreSelector, OmniScoreSelectorConfig, dropped_count,
                          omniscore_parts, pair_weight, select_pairs)
from vpo_videodpo.omniscore import omniscore

# Two videos. By hand, with VBench's ranges:
#   subject_consistency (min 0.1462): (0.5731 - 0.1462) / 0.8538 = 0.5 ; 1.0 -> 1.0
#   dynamic_degree (weight 0.5):       0.4 ; 0.0
#   imaging_quality (/100 first):      0.5 ; 0.8
#   Quality  = (0.5 + 0.5*0.4 + 0.5) / 2.5 = 0.48 ; (1 + 0 + 0.8) / 2.5 = 0.72
#   Semantic = overall_consistency / 0.364 = 0.5 ; 0
#   Omni     = (4*0.48 + 0.5) / 5 = 0.484 ; (4*0.72 + 0) / 5 = 0.576
SCORES = {
    "vb.subject_consistency": torch.tensor([0.5731, 1.0]),
    "vb.dynamic_degree": torch.tensor([0.4, 0.0]),
    "iq.imaging_quality": torch.tensor([50.0, 80.0]),
    "vc.overall_consistency": torch.tensor([0.182, 0.0]),
    "total": torch.tensor([9.0, 9.0]),
}
QUALITY = {"vb.subject_consistency": None, "vb.dynamic_degree": None, "imaging_quality": None}


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=1e-6)


def test_omniscore_matches_hand_computed_values():
    parts = omniscore_parts(SCORES, QUALITY, {"overall_consistency": None})
    assert close(parts["quality"], [0.48, 0.72])
    assert close(parts["semantic"], [0.5, 0.0])
    assert close(parts["omniscore"], [0.484, 0.576])
    config = OmniScoreConfig(quality=QUALITY, semantic={"vc.overall_consistency": {}})
    assert close(OmniScore(config)(SCORES), [0.484, 0.576])


def test_semantic_set_empty_and_other_weights():
    assert close(omniscore(SCORES, QUALITY, {}), [0.48, 0.72])  # Omni = Quality
    assert close(omniscore(SCORES, QUALITY, {"overall_consistency": None}, 1.0, 1.0), [0.49, 0.36])
    # explicit normalisation: (6 / 2 - 2) / (4 - 2) = 0.5; weight irrelevant for a single key
    custom = {"x.a": {"min": 2, "max": 4, "weight": 3, "divide_by": 2}}
    assert close(omniscore({"x.a": torch.tensor([6.0])}, custom, {}), [0.5])
    # a dimension VBench does not know: [0, 1], weight 1
    assert close(omniscore({"r.a": torch.tensor([0.2]), "r.b": torch.tensor([0.6])}, {"r.a": None, "b": None}, {}),
                 [0.4])


def test_grid_shape_is_kept():
    grid = {k: v.repeat(3, 1) for k, v in SCORES.items()}  # [P=3, N=2]
    out = omniscore(grid, QUALITY, {"overall_consistency": None})
    assert out.shape == (3, 2) and close(out[2], [0.484, 0.576])


def test_missing_and_ambiguous_keys():
    with pytest.raises(VpoError, match="aesthetic_quality"):  # VBench defaults, most dims absent
        omniscore(SCORES)
    # skip: default quality set reduces to subject_consistency, dynamic_degree, imaging_quality
    assert close(omniscore(SCORES, on_missing="skip"), [0.484, 0.576])
    with pytest.raises(VpoError, match="ambiguous"):
        omniscore({"a.x": torch.ones(1), "b.x": torch.ones(1)}, {"x": None}, {})
    with pytest.raises(VpoError, match="none of the quality keys"):
        omniscore(SCORES, {"nope": None}, {}, on_missing="skip")


def test_config_errors():
    with pytest.raises(pydantic.ValidationError, match="max"):
        OmniScoreConfig(quality={"a": {"min": 1, "max": 0.5}})
    with pytest.raises(pydantic.ValidationError, match="empty"):
        OmniScoreConfig(quality={})
    with pytest.raises(pydantic.ValidationError):
        OmniScoreSelectorConfig(keep_top_fraction=0)
    with pytest.raises(pydantic.ValidationError):
        OmniScoreSelectorConfig(quality={"a": {"maximum": 1}})  # unknown key


def test_released_reweighting():
    # pair score 0.9 * 0.4 = 0.36; 0.72 / 0.36 = 2
    assert pair_weight(0.9, 0.4, 0.0) == 1.0
    assert pair_weight(0.9, 0.4, 1.0) == pytest.approx(2.0)
    assert pair_weight(0.9, 0.4, 2.0) == pytest.approx(4.0)
    assert pair_weight(0.9, 0.4, 0.5) == pytest.approx(math.sqrt(2))
    assert pair_weight(0.9, 0.4, 1.0, reference=0.36) == pytest.approx(1.0)


@pytest.mark.parametrize("scores", [(0.5, 0.0), (0.5, -0.1), (-0.2, -0.5), (0.0, 0.0), (0.5, math.nan)])
def test_a_score_at_or_below_zero_has_no_weight(scores):
    """Was (0.72 / 1e-6) ** alpha = 720000 for a product <= 0; two negative scores gave a finite, meaningless one."""
    assert pair_weight(*scores, 1.0) is None
    assert pair_weight(*scores, 0.0) == 1.0  # alpha 0: every pair weighs 1, nothing to skip


def test_weights_are_capped():
    assert pair_weight(0.1, 0.1, 1.0) == 10.0  # (0.72 / 0.01) = 72, capped at the default max_weight
    assert pair_weight(0.1, 0.1, 1.0, max_weight=None) == pytest.approx(72.0)
    assert pair_weight(0.1, 0.1, 0.5, max_weight=100.0) == pytest.approx(math.sqrt(72.0))


def test_selection_skips_and_counts_pairs_with_a_score_at_or_below_zero():
    omni = torch.tensor([[0.9, 0.0], [0.8, -0.2], [0.9, 0.4], [0.7, 0.1]])
    counts = {}
    pairs = select_pairs(omni, keep_top_fraction=1.0, alpha=1.0, counts=counts)
    assert [p.prompt_index for p in pairs] == [2, 3] and counts == {"nonpositive_score": 2}
    assert [p.weight for p in pairs] == pytest.approx([2.0, 10.0])  # 0.72 / 0.07 = 10.3 -> capped at 10
    # alpha 0 keeps them all with weight 1; the gap filter is the same whatever alpha is
    assert [p.weight for p in select_pairs(omni, keep_top_fraction=1.0, alpha=0.0)] == [1.0] * 4
    assert [p.prompt_index for p in select_pairs(omni, keep_top_fraction=0.5, alpha=1.0)] == []
    assert [p.prompt_index for p in select_pairs(omni, keep_top_fraction=0.5, alpha=0.0)] == [0, 1]


def test_selector_counts_and_reports_skipped_pairs(capsys):
    config = OmniScoreSelectorConfig(quality={"t.brightness": None}, semantic={}, keep_top_fraction=1.0, alpha=1.0)
    selector = OmniScoreSelector(config)
    grid = {"t.brightness": torch.tensor([[0.9, -0.1], [0.9, 0.5]])}
    assert [p.prompt_index for p in selector.select(grid)] == [1]
    assert [p.prompt_index for p in selector.select(grid)] == [1]
    assert selector.counts == {"nonpositive_score": 2}
    assert capsys.readouterr().err.count("OmniScore <= 0") == 1  # said once, counted every time


def test_gap_filter_keeps_top_fraction_and_skips_ties():
    omni = torch.tensor([[0.9, 0.4, 0.6],     # gap 0.5  (0 beats 1)
                         [0.5, 0.5, 0.5],     # tie: no pair
                         [0.2, 0.3, 0.25],    # gap 0.1  (1 beats 0): the smallest, dropped
                         [0.8, 0.1, 0.7],     # gap 0.7
                         [0.65, 0.55, 0.5]])  # gap 0.15 (0 beats 2)
    pairs = select_pairs(omni, keep_top_fraction=0.75)
    assert [(p.prompt_index, p.winner, p.loser) for p in pairs] == [(0, 0, 1), (3, 0, 1), (4, 0, 2)]
    assert [p.margin for p in pairs] == pytest.approx([0.5, 0.7, 0.15])
    assert all(p.weight == 1.0 for p in pairs)
    assert len(select_pairs(omni, keep_top_fraction=1.0)) == 4
    assert [p.prompt_index for p in select_pairs(omni, keep_top_fraction=0.5)] == [0, 3]
    assert select_pairs(omni, keep_top_fraction=1.0, min_gap=0.2)[0].prompt_index == 0
    assert len(select_pairs(omni, keep_top_fraction=1.0, min_gap=0.2)) == 2
    # ties in the best score: the first best is the winner
    assert select_pairs(torch.tensor([[0.3, 0.9, 0.9]]), 1.0)[0] == Pair(0, 1, 0, 1.0, pytest.approx(0.6))
    # equal gaps are dropped in prompt order
    assert [p.prompt_index for p in select_pairs(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.5)] == [1]


def test_dropped_count_like_videodpo():
    assert [dropped_count(n, 0.75) for n in (1, 3, 4, 8, 10)] == [0, 0, 1, 2, 2]
    assert dropped_count(10, 0.9) == 1 and dropped_count(10, 0.7) == 3 and dropped_count(5, 1.0) == 0


def test_mean_split_uses_the_mean_over_all_videos():
    omni = torch.tensor([[0.9, 0.8], [0.5, 0.1], [0.45, 0.2]])  # mean 2.95 / 6 = 0.4917
    kept = select_pairs(omni, keep_top_fraction=1.0, require_mean_split=True)
    assert [p.prompt_index for p in kept] == [1]  # 0: loser above the mean; 2: winner below it
    assert len(select_pairs(omni, keep_top_fraction=1.0)) == 3


def test_weights_from_omniscores():
    pairs = select_pairs(torch.tensor([[0.9, 0.4], [0.8, 0.6]]), 1.0, alpha=1.0)
    assert [p.weight for p in pairs] == pytest.approx([2.0, 0.72 / 0.48])


def test_selector_on_a_score_grid():
    config = OmniScoreSelectorConfig(quality={"t.brightness": None, "t.smoothness": {"weight": 3}}, semantic={},
                                     keep_top_fraction=0.5, alpha=1.0)
    scores = {"t.brightness": torch.tensor([[0.2, 0.6, 0.4], [0.5, 0.5, 0.5]]),
              "t.smoothness": torch.tensor([[1.0, 1.0, 1.0], [0.2, 1.0, 0.6]])}
    # Omni = (b + 3 s) / 4: row 0 = [0.8, 0.9, 0.85] (gap 0.1), row 1 = [0.275, 0.875, 0.575] (gap 0.6)
    pairs = OmniScoreSelector(config).select(scores)
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair.prompt_index, pair.winner, pair.loser) == (1, 1, 0)
    assert pair.margin == pytest.approx(0.6)
    assert pair.weight == pytest.approx(0.72 / (0.875 * 0.275))


def test_mean_split_is_strict_at_the_boundary():
    """winner > mean > loser, strictly (VideoDPO's filter): a pair whose winner or loser sits exactly at the mean
    is dropped. Mean over all six videos = 3.0 / 6 = 0.5 exactly."""
    rows = [torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.25])]
    split = select_pairs(rows, keep_top_fraction=1.0, require_mean_split=True)
    assert [(p.prompt_index, p.winner, p.loser) for p in split] == [(2, 0, 1)]
    assert len(select_pairs(rows, keep_top_fraction=1.0, require_mean_split=False)) == 3
