"""Registers the ``vjepa`` reward."""

from vpo_core import hookimpl

from .reward import VJEPAConfig, build_vjepa_reward


@hookimpl
def vpo_register_rewards(register):
    register("vjepa", build_vjepa_reward, VJEPAConfig)
