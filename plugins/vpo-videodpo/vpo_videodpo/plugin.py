"""Registers the ``omniscore`` selector, the ``videodpo_dpo`` objective and ``vpo videodpo build-pairs``."""

from vpo_core import hookimpl

from .build import configure_cli, run_cli
from .objective import VideoDPOConfig, VideoDPOObjective
from .selector import OmniScoreSelector, OmniScoreSelectorConfig


@hookimpl
def vpo_register_pair_selectors(register):
    register("omniscore", OmniScoreSelector, OmniScoreSelectorConfig)


@hookimpl
def vpo_register_objectives(register):
    register("videodpo_dpo", VideoDPOObjective, VideoDPOConfig)


@hookimpl
def vpo_register_commands(register):
    register("videodpo", configure_cli, run_cli, help="VideoDPO tools (build-pairs: OmniScore pair dataset)")
