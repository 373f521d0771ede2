"""Registers the ``cogvideox`` policy."""

from vpo_core import hookimpl

from .config import CogVideoXConfig


def build_cogvideox(config, context):
    # Imported on use: diffusers/transformers load only when a spec asks for this policy.
    from .cogvideox import build

    return build(config, context)


@hookimpl
def vpo_register_policies(register):
    register("cogvideox", build_cogvideox, CogVideoXConfig)
