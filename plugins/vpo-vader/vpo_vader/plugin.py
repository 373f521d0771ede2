"""Registers the objective ``reward_gradient`` (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import RewardGradientConfig


@hookimpl
def vpo_register_objectives(register):
    register("reward_gradient", lazy("vpo_vader.reward_gradient:RewardGradientObjective"), RewardGradientConfig)
