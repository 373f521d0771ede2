"""Registers the selector ``best_worst`` and the objective ``dpo`` (imports only the config models)."""

from vpo_core import hookimpl

from .config import BestWorstConfig, DPOConfig


def build_best_worst(config, context):
    from .selector import BestWorstSelector

    return BestWorstSelector(config, context)


def build_dpo(config, context):
    from .dpo import DPOObjective

    return DPOObjective(config, context)


@hookimpl
def vpo_register_pair_selectors(register):
    register("best_worst", build_best_worst, BestWorstConfig)


@hookimpl
def vpo_register_objectives(register):
    register("dpo", build_dpo, DPOConfig)
