"""OnlineVPO: online preference pairs (best vs worst of N samples) + Diffusion-DPO with a curriculum reference."""

from .config import BestWorstConfig, DPOConfig

__all__ = ["BestWorstConfig", "BestWorstSelector", "DPOConfig", "DPOObjective"]


def __getattr__(name):  # torch only when a part is built
    if name == "BestWorstSelector":
        from .selector import BestWorstSelector

        return BestWorstSelector
    if name == "DPOObjective":
        from .dpo import DPOObjective

        return DPOObjective
    raise AttributeError(name)
