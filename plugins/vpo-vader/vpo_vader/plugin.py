"""Registers the objective ``reward_gradient`` (imports only the config model)."""

from vpo_core import hookimpl

from .config import RewardGradientConfig


def build_reward_gradient(config, context):
    from .reward_gradient import RewardGradientObjective

    return RewardGradientObjective(config, context)


@hookimpl
def vpo_register_objectives(register):
    register("reward_gradient", build_reward_gradient, RewardGradientConfig)
