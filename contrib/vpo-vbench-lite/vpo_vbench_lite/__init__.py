"""vpo-vbench-lite: weight-free VBench-style video metrics as a vpo reward (``vbench_lite``)."""

from .config import DIMENSION_NAMES, VBenchLiteConfig

_METRICS = ("dynamic_degree", "imaging_sharpness", "motion_smoothness", "subject_consistency", "temporal_flickering")
__all__ = ["DIMENSION_NAMES", "VBenchLiteConfig", "VBenchLiteReward", *_METRICS]


def __getattr__(name):  # torch loads on first use, not when the plugin registers
    if name in _METRICS:
        from . import metrics

        return getattr(metrics, name)
    if name == "VBenchLiteReward":
        from .reward import VBenchLiteReward

        return VBenchLiteReward
    raise AttributeError(name)
