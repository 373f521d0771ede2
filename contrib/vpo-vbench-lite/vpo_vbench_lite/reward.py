"""The ``vbench_lite`` reward: the metric table and the reward class (its config model is in ``config.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from vpo_core import BuildContext, VpoError, iter_chunks

from . import metrics
from .config import DIMENSION_NAMES, VBenchLiteConfig


@dataclass(frozen=True)
class Dimension:
    """One metric: how to compute it from the config, and the fewest frames it needs."""

    build: Callable[["VBenchLiteConfig"], Callable[[torch.Tensor], torch.Tensor]]
    min_frames: int


# One entry per name of config.DIMENSION_NAMES, in that order.
DIMENSIONS: dict[str, Dimension] = {
    "temporal_flickering": Dimension(lambda c: metrics.temporal_flickering, min_frames=2),
    "motion_smoothness": Dimension(lambda c: metrics.motion_smoothness, min_frames=3),
    "dynamic_degree": Dimension(
        lambda c: partial(metrics.dynamic_degree, grid_size=c.dynamic_grid_size, scale=c.dynamic_scale),
        min_frames=2),
    "imaging_sharpness": Dimension(lambda c: partial(metrics.imaging_sharpness, scale=c.sharpness_scale),
                                   min_frames=1),
    "subject_consistency": Dimension(
        lambda c: partial(metrics.subject_consistency, grid_size=c.consistency_grid_size), min_frames=2),
}


class VBenchLiteReward:
    """Scores frames ``[B, T, 3, H, W]`` in ``[0, 1]`` on the selected dimensions; see ``metrics`` for formulas.

    Scores are computed in float32 on ``device`` in chunks of ``micro_batch_size`` videos and returned there.
    """

    def __init__(self, config: VBenchLiteConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.dimensions: tuple[str, ...] = config.selected()
        self._metrics = {name: DIMENSIONS[name].build(config) for name in self.dimensions}
        self._min_frames = max(DIMENSIONS[name].min_frames for name in self.dimensions)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        self._check(frames)
        frames = frames.to(self.device, torch.float32)  # a differentiable copy: the graph is kept
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.dimensions}
        for rows in iter_chunks(frames.shape[0], self.config.micro_batch_size):
            for name, metric in self._metrics.items():
                chunks[name].append(metric(frames[rows]))
        return {name: torch.cat(parts) for name, parts in chunks.items()}

    def _check(self, frames: torch.Tensor) -> None:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise VpoError(f"vbench_lite expects frames [B, T, 3, H, W] in [0, 1], got shape {tuple(frames.shape)}")
        if frames.shape[-2] < 3 or frames.shape[-1] < 3:
            raise VpoError(f"vbench_lite needs frames of at least 3x3 pixels, got {tuple(frames.shape[-2:])}")
        frame_count = frames.shape[1]
        if frame_count < self._min_frames:
            needy = [name for name in self.dimensions if DIMENSIONS[name].min_frames > frame_count]
            raise VpoError(
                f"vbench_lite got {frame_count} frame(s) per video, too few for {', '.join(needy)} "
                f"(motion_smoothness needs 3 frames, the other temporal dimensions 2). Decode more frames, or "
                f"score single frames with `dimensions: [imaging_sharpness]`."
            )


def build(config: VBenchLiteConfig, context: BuildContext) -> VBenchLiteReward:
    """The factory the plugin registers: scores on ``config.device``, else the run's device."""
    return VBenchLiteReward(config, device=config.device or context.device)
