"""Wan 2.1 / 2.2 policy for vpo (Wan-AI/*-Diffusers through diffusers' WanPipeline)."""

from .config import LoraSpec, WanConfig

__all__ = ["LoraSpec", "WanConfig", "WanPolicy", "build", "build_tiny_wan", "load_pipeline"]


def __getattr__(name):  # heavy imports (torch, diffusers, transformers) only when used
    if name in ("WanPolicy", "build", "load_pipeline"):
        from . import wan

        return getattr(wan, name)
    if name == "build_tiny_wan":
        from .testing import build_tiny_wan

        return build_tiny_wan
    raise AttributeError(name)
