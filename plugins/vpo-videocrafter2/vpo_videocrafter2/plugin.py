"""Registers the ``videocrafter2`` policy and the ``vpo videocrafter2 convert`` command (config models only)."""

from vpo_core import hookimpl, lazy

from .config import VideoCrafter2Config

build_videocrafter2 = lazy("vpo_videocrafter2.videocrafter2:build")


@hookimpl
def vpo_register_policies(register):
    register("videocrafter2", build_videocrafter2, VideoCrafter2Config)


@hookimpl
def vpo_register_commands(register):
    register("videocrafter2", lazy("vpo_videocrafter2.checkpoint:configure_cli"),
             lazy("vpo_videocrafter2.checkpoint:run_cli"), help="VideoCrafter2 tools (convert: model.ckpt -> safetensors)")
