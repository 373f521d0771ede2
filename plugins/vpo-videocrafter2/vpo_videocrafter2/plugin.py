"""Registers the ``videocrafter2`` policy and the ``vpo videocrafter2 convert`` command."""

from vpo_core import hookimpl

from .config import VideoCrafter2Config


def build_videocrafter2(config, context):
    # Imported on use: diffusers/transformers load only when a spec asks for this policy.
    from .videocrafter2 import build

    return build(config, context)


def configure_cli(parser):
    from .checkpoint import configure_cli

    configure_cli(parser)


def run_cli(args):
    from .checkpoint import run_cli

    return run_cli(args)


@hookimpl
def vpo_register_policies(register):
    register("videocrafter2", build_videocrafter2, VideoCrafter2Config)


@hookimpl
def vpo_register_commands(register):
    register("videocrafter2", configure_cli, run_cli, help="VideoCrafter2 tools (convert: model.ckpt -> safetensors)")
