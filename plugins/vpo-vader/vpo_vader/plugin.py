"""Registers the objective ``reward_gradient``."""

from vpo_core import hookimpl

from .reward_gradient import RewardGradientConfig, RewardGradientObjective


@hookimpl
def vpo_register_objectives(register):
    register("reward_gradient", RewardGradientObjective, RewardGradientConfig)
