"""Registers the objective ``grpo`` (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import GRPOConfig

build_grpo = lazy("vpo_grpo.objective:GRPOObjective")


@hookimpl
def vpo_register_objectives(register):
    register("grpo", build_grpo, GRPOConfig)
