"""Pair selector ``best_worst``: rank each prompt's N candidates by one score (or a weighted composite).

OnlineVPO pairs the best and the worst of the N videos sampled for a prompt; ``mode: all_pairs`` instead
returns every ordered pair (i, j) where candidate i beats j by more than ``min_gap``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from vpo_core import BuildContext, Pair, PartConfig, RunError


class BestWorstConfig(PartConfig):
    # Score key "<reward name>.<dimension>", or "total" (the spec's weighted sum over rewards).
    key: str = "total"
    # Composite ranking score sum_k w_k * s_k over several keys; replaces `key` when set.
    weights: dict[str, float] | None = None
    # Per-key normalisation before weighting, across all P*N candidates of the step: "none" keeps raw
    # scores (so weights must account for scale), "zscore" uses (s - mean) / std (std 0 -> all zeros).
    normalize: Literal["none", "zscore"] = "none"
    # A prompt gives a pair only when best - worst > min_gap (equal scores never make a pair).
    min_gap: float = Field(0.0, ge=0.0)
    mode: Literal["best_worst", "all_pairs"] = "best_worst"

    @model_validator(mode="after")
    def _key_or_weights(self) -> "BestWorstConfig":
        if self.weights is not None:
            if not self.weights:
                raise ValueError("`weights` is empty; give {score key: weight} or remove it to rank by `key`")
            if self.key != "total":
                raise ValueError("set either `key` (one score) or `weights` (a composite), not both")
        return self


class BestWorstSelector:
    def __init__(self, config: BestWorstConfig, context: BuildContext | None = None) -> None:
        self.config = config
        # checked against the rewards' keys by the core before any sampling
        self.score_keys = list(config.weights) if config.weights is not None else [config.key]

    def ranking_scores(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``[P, N]`` score the candidates are ranked by."""
        c = self.config
        weights = c.weights if c.weights is not None else {c.key: 1.0}
        unknown = [k for k in weights if k not in scores]
        if unknown:
            raise RunError(
                f"selector best_worst: score key(s) {unknown} not found; available keys: {sorted(scores)} "
                f"(keys are '<reward name>.<dimension>' or 'total'); fix `selector.key` / `selector.weights`")
        total = None
        for key, weight in weights.items():
            value = scores[key].detach().float()
            if c.normalize == "zscore":
                std = value.std(unbiased=False)
                value = (value - value.mean()) / std if std > 0 else torch.zeros_like(value)
            total = weight * value if total is None else total + weight * value
        return total

    def select(self, scores: dict[str, torch.Tensor]) -> list[Pair]:
        grid = self.ranking_scores(scores).cpu()
        pairs = []
        for p, row in enumerate(grid):
            if self.config.mode == "best_worst":
                best, worst = int(row.argmax()), int(row.argmin())
                candidates = [(best, worst)]
            else:
                n = row.shape[0]
                candidates = [(i, j) for i in range(n) for j in range(n) if i != j]
            for winner, loser in candidates:
                gap = float(row[winner] - row[loser])
                if gap > self.config.min_gap:
                    pairs.append(Pair(prompt_index=p, winner=winner, loser=loser, weight=1.0, margin=gap))
        return pairs
