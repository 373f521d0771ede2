"""Registers the objective ``grpo`` (imports only the config model)."""

from vpo_core import hookimpl

from .config import GRPOConfig


def build_grpo(config, context):
    from .objective import GRPOObjective

    return GRPOObjective(config, context)


@hookimpl
def vpo_register_objectives(register):
    register("grpo", build_grpo, GRPOConfig)
