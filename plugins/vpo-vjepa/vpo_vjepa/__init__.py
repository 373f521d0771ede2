"""V-JEPA 2 temporal-consistency reward for vpo."""

from .reward import VJEPAConfig, VJEPAReward, build_vjepa_reward, load_vjepa2, make_mask

__all__ = ["VJEPAConfig", "VJEPAReward", "build_vjepa_reward", "load_vjepa2", "make_mask"]
