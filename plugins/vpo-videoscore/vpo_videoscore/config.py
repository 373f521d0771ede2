"""Config model of the ``videoscore`` reward (light: no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from vpo_core import RewardConfig

# Head outputs of every VideoScore regression checkpoint, in order.
DIMENSIONS = (
    "visual_quality",
    "temporal_consistency",
    "dynamic_degree",
    "text_alignment",
    "factual_consistency",
)


class VideoScoreConfig(RewardConfig):
    """Config of the ``videoscore`` reward (see the plugin README for a spec example)."""

    differentiable: ClassVar[bool] = True  # scores are computed from the pixels with torch ops

    model: str = "TIGER-Lab/VideoScore-v1.1"
    revision: str | None = None
    # "auto": read from config.json (model_type idefics2 -> VideoScore/-v1.1, qwen2_vl -> VideoScore-Qwen2-VL).
    variant: Literal["auto", "idefics2", "qwen2vl"] = "auto"
    # Frames per clip, sampled as each release does. None: 48 for an Idefics2 model named *v1.1*, 16 for the
    # other Idefics2 (v1); Qwen2-VL: the release's 8-fps rule, which needs video_fps.
    num_frames: int | None = Field(default=None, ge=1)
    # Qwen2-VL only: frames per second of the policy's videos (CogVideoX: 8; Open-Sora v1.2: 24). The release
    # samples 8 frames per second of video, so this decides how many frames the model sees.
    video_fps: float = Field(default=8.0, gt=0)
    dimensions: list[str] | Literal["all"] = "all"
    # When set, the reward also returns "weighted" = sum_d weights[d] * score_d.
    weights: dict[str, float] | None = None
    micro_batch_size: int = Field(default=1, ge=1)
    # "auto": bfloat16 on CUDA, float32 elsewhere.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = None  # None: the run's device
    # Qwen2-VL only: per-frame pixel budget (None: qwen_vl_utils' video defaults 128*28*28 .. 768*28*28).
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value):
        return [value] if isinstance(value, str) and value != "all" else value

    @field_validator("dimensions")
    @classmethod
    def _known_dimensions(cls, value):
        if value == "all":
            return value
        if not value:
            raise ValueError(f"choose at least one dimension of {', '.join(DIMENSIONS)} (or 'all')")
        unknown = [d for d in value if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown VideoScore dimension(s) {unknown}; valid: {', '.join(DIMENSIONS)} or 'all'")
        if len(set(value)) != len(value):
            raise ValueError(f"dimensions listed twice: {value}")
        return value

    @model_validator(mode="after")
    def _known_weights(self):
        if self.weights is not None:
            selected = self.selected_dimensions()
            unknown = [d for d in self.weights if d not in selected]
            if unknown or not self.weights:
                raise ValueError(
                    f"weights must name selected dimensions; got {sorted(self.weights)}, selected: "
                    f"{', '.join(selected)} (valid dimensions: {', '.join(DIMENSIONS)})"
                )
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        return self

    def score_dimensions(self) -> list[str]:
        return [*self.selected_dimensions(), *(["weighted"] if self.weights else [])]

    def selected_dimensions(self) -> tuple[str, ...]:
        return DIMENSIONS if self.dimensions == "all" else tuple(self.dimensions)
