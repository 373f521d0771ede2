"""VideoCrafter2 policy for vpo (VideoCrafter/VideoCrafter2's model.ckpt: LVDM UNet, SD VAE, OpenCLIP text)."""

from .config import LoraSpec, VideoCrafter2Config

__all__ = ["LoraSpec", "VideoCrafter2Config", "VideoCrafter2Policy", "build", "build_tiny_videocrafter2"]


def __getattr__(name):  # heavy imports (diffusers, transformers) only when used
    if name in ("VideoCrafter2Policy", "build"):
        from . import videocrafter2

        return getattr(videocrafter2, name)
    if name == "build_tiny_videocrafter2":
        from .testing import build_tiny_videocrafter2

        return build_tiny_videocrafter2
    raise AttributeError(name)
