"""Registers the ``vjepa`` reward (imports only the config model)."""

from vpo_core import hookimpl

from .config import VJEPAConfig


def build_vjepa(config, context):
    from .reward import build_vjepa_reward

    return build_vjepa_reward(config, context)


@hookimpl
def vpo_register_rewards(register):
    register("vjepa", build_vjepa, VJEPAConfig)
