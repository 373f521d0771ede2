"""Registers the ``hpsv2`` reward and the ``vpo hpsv2 convert`` command (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import HPSv2Config

build_hpsv2 = lazy("vpo_hpsv2.reward:build_hpsv2_reward")


@hookimpl
def vpo_register_rewards(register):
    register("hpsv2", build_hpsv2, HPSv2Config)


@hookimpl
def vpo_register_commands(register):
    register("hpsv2", lazy("vpo_hpsv2.convert:configure_cli"), lazy("vpo_hpsv2.convert:run_cli"),
             help="HPSv2 tools (convert: open_clip checkpoint -> CLIPModel dir)")
