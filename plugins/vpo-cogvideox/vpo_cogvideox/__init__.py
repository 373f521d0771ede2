"""CogVideoX policy for vpo (THUDM/CogVideoX-2b / -5b through diffusers)."""

from .config import CogVideoXConfig, LoraSpec

__all__ = ["CogVideoXConfig", "CogVideoXPolicy", "LoraSpec", "build", "build_tiny_cogvideox", "load_pipeline"]


def __getattr__(name):  # heavy imports (diffusers, transformers) only when used
    if name in ("CogVideoXPolicy", "build", "load_pipeline"):
        from . import cogvideox

        return getattr(cogvideox, name)
    if name == "build_tiny_cogvideox":
        from .testing import build_tiny_cogvideox

        return build_tiny_cogvideox
    raise AttributeError(name)
