"""Registers the ``omniscore`` selector, the ``videodpo_dpo`` objective and ``vpo videodpo build-pairs``
(imports only the config models: torch loads when a part is built or the command runs)."""

from vpo_core import hookimpl, lazy

from .config import OmniScoreSelectorConfig, VideoDPOConfig


@hookimpl
def vpo_register_pair_selectors(register):
    register("omniscore", lazy("vpo_videodpo.selector:OmniScoreSelector"), OmniScoreSelectorConfig)


@hookimpl
def vpo_register_objectives(register):
    register("videodpo_dpo", lazy("vpo_videodpo.objective:VideoDPOObjective"), VideoDPOConfig)


@hookimpl
def vpo_register_commands(register):
    register("videodpo", lazy("vpo_videodpo.build:configure_cli"), lazy("vpo_videodpo.build:run_cli"),
             help="VideoDPO tools (build-pairs: OmniScore pair dataset)")
