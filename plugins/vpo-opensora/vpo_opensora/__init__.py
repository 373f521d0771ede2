"""Open-Sora v1.2 policy for vpo (hpcai-tech/OpenSora-STDiT-v3, OpenSora-VAE-v1.2, T5-v1.1-XXL)."""

from .config import LoraSpec, OpenSoraConfig

__all__ = ["LoraSpec", "OpenSoraConfig", "OpenSoraPolicy", "OpenSoraVAE", "STDiT3", "build", "build_tiny_opensora"]

_LAZY = {"OpenSoraPolicy": "opensora", "build": "opensora", "STDiT3": "stdit3", "OpenSoraVAE": "vae",
         "build_tiny_opensora": "testing"}


def __getattr__(name):  # heavy imports (torch, diffusers, transformers) only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
