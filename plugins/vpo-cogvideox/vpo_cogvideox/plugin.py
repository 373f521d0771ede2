"""Registers the ``cogvideox`` policy (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import CogVideoXConfig

build_cogvideox = lazy("vpo_cogvideox.cogvideox:build")  # diffusers and transformers load when a spec uses it


@hookimpl
def vpo_register_policies(register):
    register("cogvideox", build_cogvideox, CogVideoXConfig)
