"""Pair selector ``omniscore``: VideoDPO's pair construction on OmniScores.

Per prompt the best and the worst of its N candidates make a pair (margin = OmniScore gap). Filters, in
order: equal scores never pair (gap must exceed ``min_gap``); optional ``require_mean_split`` keeps a pair
only when winner > mean > loser, strictly (a video exactly at the mean is on neither side, so its pair is
dropped), the mean taken over *all* scored videos (VideoDPO's filter_out_avg uses
the dataset-wide average OmniScore); then ``keep_top_fraction`` keeps the pairs with the largest gaps
(VideoDPO drops the 25 % with the smallest gaps: ``int(n * (1 - keep))`` pairs are dropped).

Scope of the gap filter: ``select`` only sees the prompts of one call (one training step online, one prompt
per call in ``vpo build-pairs``). For an offline dataset the filter must rank the whole dataset, which
``vpo videodpo build-pairs`` does in its finalise pass (``vpo_videodpo.build.finalise_pair_dataset``) with
this same function.

Re-weighting as in VideoDPO's released code: pair score = OmniScore(winner) * OmniScore(loser),
weight = (weight_reference / pair score) ** alpha, alpha = 0 -> weight 1. (The paper's Eq. 3 describes a
frequency-probability weighting; the released code does this instead.) Two additions, because OmniScores are
not clipped to [0, 1]: with alpha != 0 a pair with a score <= 0 has no weight (the formula is infinite or
meaningless there) and is skipped and counted, never clamped; and every weight is capped at ``max_weight``.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
from vpo_core import BuildContext, Pair

from .config import DEFAULT_MAX_WEIGHT, OmniScoreSelectorConfig  # noqa: F401
from .omniscore import OmniScore



def pair_weight(score_winner: float, score_loser: float, alpha: float, reference: float = 0.72,
                max_weight: float | None = DEFAULT_MAX_WEIGHT) -> float | None:
    """VideoDPO's released re-weighting ``(reference / (s_w * s_l)) ** alpha``, capped at ``max_weight``.

    1 when alpha is 0. None when alpha != 0 and a score is not positive (or NaN): the weight is undefined there,
    the caller skips the pair and counts it. (Two negative scores would give a positive product whose weight
    means nothing, hence the test on each score.)
    """
    if alpha == 0:
        return 1.0
    if not (score_winner > 0 and score_loser > 0):
        return None
    weight = (reference / (score_winner * score_loser)) ** alpha
    return weight if max_weight is None else min(weight, max_weight)


def dropped_count(n: int, keep_top_fraction: float) -> int:
    """How many of ``n`` pairs the gap filter drops (VideoDPO: int(n * filter_ratio))."""
    return int(math.floor(n * (1.0 - keep_top_fraction) + 1e-9))


def select_pairs(omni: torch.Tensor | Sequence[torch.Tensor], keep_top_fraction: float = 0.75,
                 require_mean_split: bool = False, min_gap: float = 0.0, alpha: float = 0.0,
                 weight_reference: float = 0.72, max_weight: float | None = DEFAULT_MAX_WEIGHT,
                 counts: dict | None = None) -> list[Pair]:
    """Best-vs-worst pairs from OmniScores: ``omni[p]`` holds prompt p's candidates (rows may differ in length).

    Ties: the first best and first worst candidate are taken; a prompt whose gap is <= ``min_gap`` (all equal
    when min_gap is 0) gives no pair. Pairs with equal gaps are dropped in prompt order. The mean of the mean
    split is over every video of every row given (one call of the selector, or the whole dataset). Last, with
    alpha != 0, pairs with a non-positive score are skipped (after the gap filter, so the filter keeps the same
    pairs whatever alpha is); their number is added to ``counts["nonpositive_score"]`` when ``counts`` is given.
    """
    rows = [torch.as_tensor(row).detach().double().reshape(-1) for row in omni]
    rows = [row if torch.isfinite(row).all() else row[:0] for row in rows]  # non-finite rows make no pair
    values = torch.cat(rows) if rows else torch.zeros(0)
    mean = float(values.mean()) if values.numel() else 0.0
    candidates = []  # (gap, prompt, winner, loser, s_w, s_l)
    for p, row in enumerate(rows):
        if row.numel() < 2:
            continue
        winner, loser = int(row.argmax()), int(row.argmin())
        s_w, s_l = float(row[winner]), float(row[loser])
        gap = s_w - s_l
        if gap <= min_gap:
            continue
        if require_mean_split and not (s_w > mean > s_l):
            continue
        candidates.append((gap, p, winner, loser, s_w, s_l))
    drop = dropped_count(len(candidates), keep_top_fraction)
    dropped = {c[1] for c in sorted(candidates, key=lambda c: (c[0], c[1]))[:drop]}
    pairs = []
    for gap, p, w, l, s_w, s_l in candidates:
        if p in dropped:
            continue
        weight = pair_weight(s_w, s_l, alpha, weight_reference, max_weight)
        if weight is None:
            if counts is not None:
                counts["nonpositive_score"] = counts.get("nonpositive_score", 0) + 1
            continue
        pairs.append(Pair(p, w, l, weight, gap))
    return pairs


class OmniScoreSelector:
    def __init__(self, config: OmniScoreSelectorConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.omniscore = OmniScore(config)
        self.counts: dict[str, int] = {}  # pairs skipped so far, by reason

    def select(self, scores: dict[str, torch.Tensor]) -> list[Pair]:
        c = self.config
        before = self.counts.get("nonpositive_score", 0)
        pairs = select_pairs(self.omniscore(scores), c.keep_top_fraction, c.require_mean_split, c.min_gap,
                             c.alpha, c.weight_reference, c.max_weight, self.counts)
        if before == 0 and self.counts.get("nonpositive_score", 0):  # once per run: the count is in .counts
            print(f"vpo: omniscore selector: skipping pairs with an OmniScore <= 0 (their weight "
                  f"(weight_reference / (s_w * s_l)) ** {c.alpha} is undefined)", file=sys.stderr)
        return pairs
