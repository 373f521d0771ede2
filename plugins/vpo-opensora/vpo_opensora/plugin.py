"""Registers the ``opensora`` policy (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import OpenSoraConfig

build_opensora = lazy("vpo_opensora.opensora:build")  # torch, diffusers and transformers load when a spec uses it


@hookimpl
def vpo_register_policies(register):
    register("opensora", build_opensora, OpenSoraConfig)
