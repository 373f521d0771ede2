"""Registers the ``omniscore`` selector, the ``videodpo_dpo`` objective and ``vpo videodpo build-pairs``
(imports only the config models: torch loads when a part is built or the command runs)."""

from vpo_core import hookimpl

from .config import OmniScoreSelectorConfig, VideoDPOConfig


def build_omniscore(config, context):
    from .selector import OmniScoreSelector

    return OmniScoreSelector(config, context)


def build_videodpo_dpo(config, context):
    from .objective import VideoDPOObjective

    return VideoDPOObjective(config, context)


def configure_cli(parser):
    from .build import configure_cli

    configure_cli(parser)


def run_cli(args):
    from .build import run_cli

    return run_cli(args)


@hookimpl
def vpo_register_pair_selectors(register):
    register("omniscore", build_omniscore, OmniScoreSelectorConfig)


@hookimpl
def vpo_register_objectives(register):
    register("videodpo_dpo", build_videodpo_dpo, VideoDPOConfig)


@hookimpl
def vpo_register_commands(register):
    register("videodpo", configure_cli, run_cli, help="VideoDPO tools (build-pairs: OmniScore pair dataset)")
