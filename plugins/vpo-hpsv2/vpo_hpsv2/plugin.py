"""Registers the ``hpsv2`` reward and the ``vpo hpsv2 convert`` command."""

from vpo_core import hookimpl

from .convert import configure_cli, run_cli
from .reward import HPSv2Config, build_hpsv2_reward


@hookimpl
def vpo_register_rewards(register):
    register("hpsv2", build_hpsv2_reward, HPSv2Config)


@hookimpl
def vpo_register_commands(register):
    register("hpsv2", configure_cli, run_cli, help="HPSv2 tools (convert: open_clip checkpoint -> CLIPModel dir)")
