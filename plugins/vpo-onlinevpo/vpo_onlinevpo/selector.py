"""Pair selector ``best_worst``: rank each prompt's N candidates by one score (or a weighted composite).

OnlineVPO pairs the best and the worst of the N videos sampled for a prompt; ``mode: all_pairs`` instead
returns every ordered pair (i, j) where candidate i beats j by more than ``min_gap``.
"""

from __future__ import annotations

import torch
from vpo_core import BuildContext, Pair, RunError

from .config import BestWorstConfig


class BestWorstSelector:
    def __init__(self, config: BestWorstConfig, context: BuildContext | None = None) -> None:
        self.config = config

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
