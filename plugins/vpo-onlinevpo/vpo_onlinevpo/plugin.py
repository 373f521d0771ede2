"""Registers the selector ``best_worst`` and the objective ``dpo`` (imports only the config models)."""

from vpo_core import hookimpl, lazy

from .config import BestWorstConfig, DPOConfig


@hookimpl
def vpo_register_pair_selectors(register):
    register("best_worst", lazy("vpo_onlinevpo.selector:BestWorstSelector"), BestWorstConfig)


@hookimpl
def vpo_register_objectives(register):
    register("dpo", lazy("vpo_onlinevpo.dpo:DPOObjective"), DPOConfig)
