"""GRPO on denoising trajectories for vpo (Flow-GRPO / DanceGRPO / DDPO family), with any reward."""

from .config import GRPOConfig

__all__ = ["GRPOConfig", "GRPOObjective", "group_advantages"]


def __getattr__(name):  # torch loads when the objective is built
    if name in ("GRPOObjective", "group_advantages"):
        from . import objective

        return getattr(objective, name)
    raise AttributeError(name)
