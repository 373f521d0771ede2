"""Config models of the toy world's rewards (light: no torch)."""

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


class ToyWorldVideoProxyConfig(RewardConfig):
    """Learned video reward (sees all frames); an approximation of ``toyworld``, as VideoScore is of people."""

    differentiable: ClassVar[bool] = True

    weights: str | None = None  # a .safetensors file from train_proxies.py; null: the shipped video.safetensors

    def score_dimensions(self) -> list[str]:
        return ["color", "direction", "flicker", "overall"]


class ToyWorldImageProxyConfig(RewardConfig):
    """Learned image reward: the mean of per-frame scores, blind to motion (as HPS is)."""

    differentiable: ClassVar[bool] = True

    weights: str | None = None  # null: the shipped image.safetensors

    def score_dimensions(self) -> list[str]:
        return ["overall"]
