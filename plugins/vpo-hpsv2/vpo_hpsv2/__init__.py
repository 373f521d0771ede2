"""HPSv2 / HPSv2.1 human-preference reward for vpo."""

from .config import HPSv2Config

_LAZY = {"HPSv2Reward": "reward", "build_hpsv2_reward": "reward", "load_hpsv2": "reward",
         "clip_config_from_state_dict": "convert", "clip_model_from_open_clip": "convert",
         "convert_state_dict": "convert", "load_open_clip_state_dict": "convert"}
__all__ = ["HPSv2Config", *_LAZY]


def __getattr__(name):  # torch and transformers load when the reward is built
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
