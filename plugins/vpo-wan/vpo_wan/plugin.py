"""Registers the ``wan`` policy."""

from vpo_core import hookimpl

from .config import WanConfig


def build_wan(config, context):
    # Imported on use: torch/diffusers/transformers load only when a spec asks for this policy.
    from .wan import build

    return build(config, context)


@hookimpl
def vpo_register_policies(register):
    register("wan", build_wan, WanConfig)
