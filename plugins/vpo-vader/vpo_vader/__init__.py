"""VADER: back-propagate differentiable rewards through the last denoising steps of a rollout."""

from .reward_gradient import RewardGradientConfig, RewardGradientObjective, RewardShape

__all__ = ["RewardGradientConfig", "RewardGradientObjective", "RewardShape"]
