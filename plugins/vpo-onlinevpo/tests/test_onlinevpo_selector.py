"""best_worst: best vs worst per prompt, ties and min_gap, composite weights, z-scores, all_pairs, key errors."""

from __future__ import annotations

import pydantic
import pytest
import torch
from vpo_core import Pair, VpoError
from vpo_onlinevpo import BestWorstConfig, BestWorstSelector


def select(scores, **config):
    return BestWorstSelector(BestWorstConfig(**config)).select(scores)


def test_best_vs_worst_per_prompt_with_gap_as_margin():
    total = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, 1.0, 4.0, 3.0]])
    pairs = select({"total": total})
    assert [(p.prompt_index, p.winner, p.loser) for p in pairs] == [(0, 1, 0), (1, 2, 1)]
    assert pairs[0].margin == pytest.approx(0.8) and pairs[1].margin == pytest.approx(3.0)
    assert all(p.weight == 1.0 for p in pairs)


def test_ties_and_min_gap_skip_prompts():
    total = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.25, 0.125], [0.0, 1.0, 0.5]])
    assert [p.prompt_index for p in select({"total": total})] == [1, 2]  # all-equal prompt 0: no pair
    assert [p.prompt_index for p in select({"total": total}, min_gap=0.25)] == [2]  # gap must exceed min_gap
    assert select({"total": total}, min_gap=1.0) == []


def test_one_score_key():
    scores = {"total": torch.tensor([[1.0, 0.0]]), "vs.temporal_consistency": torch.tensor([[2.0, 3.0]])}
    (pair,) = select(scores, key="vs.temporal_consistency")
    assert (pair.winner, pair.loser, pair.margin) == (1, 0, 1.0)


def test_weighted_composite_raw_and_zscore():
    a = torch.tensor([[0.0, 1.0, 2.0]])
    b = torch.tensor([[30.0, 0.0, 10.0]])
    scores = {"r.a": a, "r.b": b}
    # raw: 1*a + 0.1*b = [3, 1, 3] -> best index 0 (first max), worst 1
    (pair,) = select(scores, weights={"r.a": 1.0, "r.b": 0.1})
    assert (pair.winner, pair.loser) == (0, 1) and pair.margin == pytest.approx(2.0)
    # zscore: a -> [-1.2247, 0, 1.2247], b -> [1.3363, -1.0690, -0.2673]; sum = [0.1116, -1.0690, 0.9574]
    za = (a - a.mean()) / a.std(unbiased=False)
    zb = (b - b.mean()) / b.std(unbiased=False)
    composite = za + zb
    (pair,) = select(scores, weights={"r.a": 1.0, "r.b": 1.0}, normalize="zscore")
    assert (pair.winner, pair.loser) == (2, 1)
    assert pair.margin == pytest.approx(float(composite[0, 2] - composite[0, 1]), rel=1e-5)


def test_zscore_normalises_across_the_whole_batch_not_per_prompt():
    # Prompt 1's scores are constant; across the P*N batch they still have a spread, so prompt 0 decides.
    scores = {"total": torch.tensor([[0.0, 4.0], [2.0, 2.0]])}
    pairs = select(scores, normalize="zscore")
    assert [(p.prompt_index, p.winner, p.loser) for p in pairs] == [(0, 1, 0)]
    assert pairs[0].margin == pytest.approx(4.0 / 1.4142135, rel=1e-5)  # std of [0,4,2,2] = sqrt(2)


def test_all_pairs_mode():
    total = torch.tensor([[0.0, 2.0, 1.0, 1.0]])
    pairs = select({"total": total}, mode="all_pairs")
    got = {(p.winner, p.loser): p.margin for p in pairs}
    assert got == {(1, 0): 2.0, (2, 0): 1.0, (3, 0): 1.0, (1, 2): 1.0, (1, 3): 1.0}  # the 2-3 tie: no pair
    pairs = select({"total": total}, mode="all_pairs", min_gap=1.0)
    assert [(p.winner, p.loser) for p in pairs] == [(1, 0)]
    assert all(isinstance(p, Pair) for p in pairs)


def test_unknown_key_lists_available_keys():
    scores = {"total": torch.zeros(1, 2), "vs.visual_quality": torch.zeros(1, 2)}
    with pytest.raises(VpoError, match=r"vs\.temporal_consistency.*available keys: \['total', 'vs\.visual_quality'\]"):
        select(scores, key="vs.temporal_consistency")
    with pytest.raises(VpoError, match="nope"):
        select(scores, weights={"total": 1.0, "nope": 1.0})


def test_config_errors():
    with pytest.raises(pydantic.ValidationError, match="either `key`"):
        BestWorstConfig(key="a.b", weights={"a.c": 1.0})
    with pytest.raises(pydantic.ValidationError):
        BestWorstConfig(min_gap=-1)
    with pytest.raises(pydantic.ValidationError):
        BestWorstConfig(mode="best")
