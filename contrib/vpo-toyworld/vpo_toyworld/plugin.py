"""Hook implementations: registers the ``toyworld`` reward."""

from vpo_core import hookimpl

from .reward import ToyWorldRewardConfig, build_toyworld_reward


@hookimpl
def vpo_register_rewards(register):
    register("toyworld", build_toyworld_reward, ToyWorldRewardConfig)
