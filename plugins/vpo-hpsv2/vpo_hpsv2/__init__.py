"""HPSv2 / HPSv2.1 human-preference reward for vpo."""

from .convert import (
    clip_config_from_state_dict,
    clip_model_from_open_clip,
    convert_state_dict,
    load_open_clip_state_dict,
)
from .reward import HPSv2Config, HPSv2Reward, build_hpsv2_reward, load_hpsv2

__all__ = [
    "HPSv2Config", "HPSv2Reward", "build_hpsv2_reward", "clip_config_from_state_dict", "clip_model_from_open_clip",
    "convert_state_dict", "load_hpsv2", "load_open_clip_state_dict",
]
