"""Registers the ``opensora`` policy."""

from vpo_core import hookimpl

from .config import OpenSoraConfig


def build_opensora(config, context):
    # Imported on use: torch, diffusers and transformers load only when a spec asks for this policy.
    from .opensora import build

    return build(config, context)


@hookimpl
def vpo_register_policies(register):
    register("opensora", build_opensora, OpenSoraConfig)
