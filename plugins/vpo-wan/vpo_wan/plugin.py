"""Registers the ``wan`` policy (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import WanConfig

build_wan = lazy("vpo_wan.wan:build")  # torch, diffusers and transformers load when a spec uses it


@hookimpl
def vpo_register_policies(register):
    register("wan", build_wan, WanConfig)
