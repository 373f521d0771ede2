"""VideoScore reward for vpo (TIGER-Lab/VideoScore, VideoScore-v1.1, VideoScore-Qwen2-VL)."""

from .common import DIMENSIONS, CheckpointError
from .reward import VideoScoreConfig, VideoScoreReward, build

__all__ = ["DIMENSIONS", "CheckpointError", "VideoScoreConfig", "VideoScoreReward", "build"]
