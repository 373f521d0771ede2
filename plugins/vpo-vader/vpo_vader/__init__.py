"""VADER: back-propagate differentiable rewards through the last denoising steps of a rollout."""

from .config import RewardGradientConfig, RewardShape

__all__ = ["RewardGradientConfig", "RewardGradientObjective", "RewardShape"]


def __getattr__(name):  # torch only when the objective is built
    if name == "RewardGradientObjective":
        from .reward_gradient import RewardGradientObjective

        return RewardGradientObjective
    raise AttributeError(name)
