"""VideoScore reward for vpo (TIGER-Lab/VideoScore, VideoScore-v1.1, VideoScore-Qwen2-VL)."""

from .config import DIMENSIONS, VideoScoreConfig

__all__ = ["DIMENSIONS", "CheckpointError", "VideoScoreConfig", "VideoScoreReward", "build"]


def __getattr__(name):  # torch and transformers load when the reward is built
    if name == "CheckpointError":
        from .common import CheckpointError

        return CheckpointError
    if name in ("VideoScoreReward", "build"):
        from . import reward

        return getattr(reward, name)
    raise AttributeError(name)
