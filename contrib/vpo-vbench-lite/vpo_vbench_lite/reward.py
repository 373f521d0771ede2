"""The ``vbench_lite`` reward: its config model, the reward class and the factory the plugin registers."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator
from vpo_core import BuildContext, PartConfig, VpoError, iter_chunks

from . import metrics


@dataclass(frozen=True)
class Dimension:
    """One metric: how to compute it from the config, the fewest frames it needs, and whether it keeps a graph."""

    build: Callable[["VBenchLiteConfig"], Callable[[torch.Tensor], torch.Tensor]]
    min_frames: int
    differentiable: bool = True


# The order here is the order of ``dimensions`` when the config says "all".
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


class VBenchLiteConfig(PartConfig):
    """Spec keys of a ``vbench_lite`` reward (besides the core's ``type``, ``name`` and ``weight``)."""

    dimensions: list[str] | Literal["all"] = "all"
    micro_batch_size: int = Field(8, ge=1, description="videos scored at once")
    device: str | None = Field(None, description="where to score, e.g. 'cuda:1'; default: the run's device")
    dynamic_grid_size: int = Field(32, ge=1, description="dynamic_degree: luma is average-pooled to this size")
    dynamic_scale: float = Field(0.02, gt=0, description="dynamic_degree: mean luma change that scores 0.5")
    sharpness_scale: float = Field(0.01, gt=0, description="imaging_sharpness: Laplacian variance that scores 0.5")
    consistency_grid_size: int = Field(16, ge=1, description="subject_consistency: frames pooled to this size")

    @field_validator("dimensions", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("dimensions")
    @classmethod
    def _known_dimensions(cls, value: list[str] | str) -> list[str] | str:
        if value == "all":
            return value
        valid = ", ".join(DIMENSIONS)
        if not value:
            raise ValueError(f"choose at least one dimension (or 'all'); valid dimensions: {valid}")
        unknown = [name for name in value if name not in DIMENSIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], DIMENSIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown dimension(s) {', '.join(map(repr, unknown))}{hint}; valid dimensions: {valid}")
        if len(set(value)) != len(value):
            raise ValueError(f"dimensions are listed twice: {value}")
        return value

    def selected(self) -> tuple[str, ...]:
        return tuple(DIMENSIONS) if self.dimensions == "all" else tuple(self.dimensions)


class VBenchLiteReward:
    """Scores frames ``[B, T, 3, H, W]`` in ``[0, 1]`` on the selected dimensions; see ``metrics`` for formulas.

    Scores are computed in float32 on ``device`` in chunks of ``micro_batch_size`` videos and returned there.
    """

    def __init__(self, config: VBenchLiteConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.dimensions: tuple[str, ...] = config.selected()
        self.differentiable: bool = all(DIMENSIONS[name].differentiable for name in self.dimensions)
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


def build_vbench_lite(config: VBenchLiteConfig, context: BuildContext) -> VBenchLiteReward:
    return VBenchLiteReward(config, device=config.device or context.device)
