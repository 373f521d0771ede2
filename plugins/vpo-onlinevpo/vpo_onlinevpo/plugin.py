"""Registers the selector ``best_worst`` and the objective ``dpo``."""

from vpo_core import hookimpl

from .dpo import DPOConfig, DPOObjective
from .selector import BestWorstConfig, BestWorstSelector


@hookimpl
def vpo_register_pair_selectors(register):
    register("best_worst", BestWorstSelector, BestWorstConfig)


@hookimpl
def vpo_register_objectives(register):
    register("dpo", DPOObjective, DPOConfig)
