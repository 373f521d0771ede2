"""Config model of the ``toyworld`` reward (light: no torch)."""

from __future__ import annotations

from typing import ClassVar

from vpo_core import RewardConfig


class ToyWorldRewardConfig(RewardConfig):
    differentiable: ClassVar[bool] = True

    color_weight: float = 0.4
    direction_weight: float = 0.4
    flicker_weight: float = 0.2

    def score_dimensions(self) -> list[str]:
        return ["color", "direction", "flicker", "overall"]
