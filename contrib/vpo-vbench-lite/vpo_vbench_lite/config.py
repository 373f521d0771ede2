"""Config model of the ``vbench_lite`` reward. It imports no torch, so registering the plugin and validating a
spec stay fast; the reward itself (``reward.py``) loads when a run builds it."""

from __future__ import annotations

import difflib
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from vpo_core import RewardConfig

# Every dimension the reward can score; "all" in a spec means these, in this order.
DIMENSION_NAMES = ("temporal_flickering", "motion_smoothness", "dynamic_degree", "imaging_sharpness",
                   "subject_consistency")


class VBenchLiteConfig(RewardConfig):
    differentiable: ClassVar[bool] = True  # every metric is computed with differentiable torch ops

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
        valid = ", ".join(DIMENSION_NAMES)
        if not value:
            raise ValueError(f"choose at least one dimension (or 'all'); valid dimensions: {valid}")
        unknown = [name for name in value if name not in DIMENSION_NAMES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], DIMENSION_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown dimension(s) {', '.join(map(repr, unknown))}{hint}; valid dimensions: {valid}")
        if len(set(value)) != len(value):
            raise ValueError(f"dimensions are listed twice: {value}")
        return value

    def selected(self) -> tuple[str, ...]:
        return DIMENSION_NAMES if self.dimensions == "all" else tuple(self.dimensions)

    def score_dimensions(self) -> list[str]:
        return list(self.selected())
