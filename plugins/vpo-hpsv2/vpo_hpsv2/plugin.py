"""Registers the ``hpsv2`` reward and the ``vpo hpsv2 convert`` command (imports only the config model)."""

from vpo_core import hookimpl

from .config import HPSv2Config


def build_hpsv2(config, context):
    from .reward import build_hpsv2_reward

    return build_hpsv2_reward(config, context)


def configure_cli(parser):
    from .convert import configure_cli

    configure_cli(parser)


def run_cli(args):
    from .convert import run_cli

    return run_cli(args)


@hookimpl
def vpo_register_rewards(register):
    register("hpsv2", build_hpsv2, HPSv2Config)


@hookimpl
def vpo_register_commands(register):
    register("hpsv2", configure_cli, run_cli, help="HPSv2 tools (convert: open_clip checkpoint -> CLIPModel dir)")
