"""Hook implementations: registers the ``toyworld`` reward (imports only the config model)."""

from vpo_core import hookimpl

from .config import ToyWorldRewardConfig


def build_toyworld(config, context):
    from .reward import ToyWorldReward

    return ToyWorldReward(config)


@hookimpl
def vpo_register_rewards(register):
    register("toyworld", build_toyworld, ToyWorldRewardConfig)
