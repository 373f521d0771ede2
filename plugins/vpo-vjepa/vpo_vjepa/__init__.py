"""V-JEPA 2 temporal-consistency reward for vpo."""

from .config import VJEPAConfig

__all__ = ["VJEPAConfig", "VJEPAReward", "build_vjepa_reward", "load_vjepa2", "make_mask"]


def __getattr__(name):  # torch and transformers only when the reward is built
    if name in __all__:
        from . import reward

        return getattr(reward, name)
    raise AttributeError(name)
