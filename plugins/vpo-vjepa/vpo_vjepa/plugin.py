"""Registers the ``vjepa`` reward (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import VJEPAConfig


@hookimpl
def vpo_register_rewards(register):
    register("vjepa", lazy("vpo_vjepa.reward:build_vjepa_reward"), VJEPAConfig)
