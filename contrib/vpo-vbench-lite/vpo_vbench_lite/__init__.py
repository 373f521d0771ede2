"""vpo-vbench-lite: weight-free VBench-style video metrics as a vpo reward (``vbench_lite``)."""

from .metrics import (
    dynamic_degree,
    imaging_sharpness,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)
from .reward import DIMENSIONS, VBenchLiteConfig, VBenchLiteReward, build_vbench_lite

__all__ = [
    "DIMENSIONS", "VBenchLiteConfig", "VBenchLiteReward", "build_vbench_lite", "dynamic_degree",
    "imaging_sharpness", "motion_smoothness", "subject_consistency", "temporal_flickering",
]
