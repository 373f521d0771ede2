"""OnlineVPO: online preference pairs (best vs worst of N samples) + Diffusion-DPO with a curriculum reference."""

from .dpo import DPOConfig, DPOObjective
from .selector import BestWorstConfig, BestWorstSelector

__all__ = ["BestWorstConfig", "BestWorstSelector", "DPOConfig", "DPOObjective"]
