"""Config models of the ``omniscore`` selector, the ``videodpo_dpo`` objective and ``vpo videodpo build-pairs``
(light: pydantic only, so registering the plugin and validating a spec import no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from vpo_core import ObjectiveConfig, SelectorConfig

PAIR_FORMATS = ("vpo", "videodpo")

# Upper bound of a pair's weight: (0.72 / 0.072) ** 1, i.e. two OmniScores of about 0.27 at alpha 1.
DEFAULT_MAX_WEIGHT = 10.0

# VBench dimension -> (min, max, weight, divide_by). Ranges and weights from VideoDPO's OmniScore code;
# imaging_quality (MUSIQ) is reported on 0..100 and divided by 100 first.
VBENCH_DIMENSIONS: dict[str, tuple[float, float, float, float]] = {
    "subject_consistency": (0.1462, 1.0, 1.0, 1.0),
    "background_consistency": (0.2615, 1.0, 1.0, 1.0),
    "temporal_flickering": (0.6293, 1.0, 1.0, 1.0),
    "motion_smoothness": (0.706, 0.9975, 1.0, 1.0),
    "dynamic_degree": (0.0, 1.0, 0.5, 1.0),
    "aesthetic_quality": (0.0, 1.0, 1.0, 1.0),
    "imaging_quality": (0.0, 1.0, 1.0, 100.0),
    "object_class": (0.0, 1.0, 1.0, 1.0),
    "multiple_objects": (0.0, 1.0, 1.0, 1.0),
    "human_action": (0.0, 1.0, 1.0, 1.0),
    "color": (0.0, 1.0, 1.0, 1.0),
    "spatial_relationship": (0.0, 1.0, 1.0, 1.0),
    "scene": (0.0, 0.8222, 1.0, 1.0),
    "appearance_style": (0.0009, 0.2855, 1.0, 1.0),
    "temporal_style": (0.0, 0.364, 1.0, 1.0),
    "overall_consistency": (0.0, 0.364, 1.0, 1.0),
}
# VideoDPO's quality set (VBench's quality dimensions) and its semantic set (ViCLIP overall consistency).
VBENCH_QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                  "dynamic_degree", "aesthetic_quality", "imaging_quality")
VBENCH_SEMANTIC = ("overall_consistency",)


class NormSpec(BaseModel):
    """Normalisation of one key; unset fields take the VBench value of the dimension, else 0 / 1 / 1 / 1."""

    model_config = ConfigDict(extra="forbid")

    min: Optional[float] = None
    max: Optional[float] = None
    weight: Optional[float] = Field(None, ge=0)
    divide_by: Optional[float] = Field(None, gt=0)

    def resolved(self, key: str) -> tuple[float, float, float, float]:
        """(min, max, weight, divide_by) for ``key``."""
        base = VBENCH_DIMENSIONS.get(key.rsplit(".", 1)[-1], (0.0, 1.0, 1.0, 1.0))
        values = [base[i] if v is None else v for i, v in enumerate((self.min, self.max, self.weight, self.divide_by))]
        if values[1] <= values[0]:
            raise ValueError(f"'{key}': max ({values[1]}) must be greater than min ({values[0]})")
        return tuple(values)  # type: ignore[return-value]


class OmniScoreConfig(SelectorConfig):
    """The OmniScore keys of a config section (shared by the selector and ``vpo videodpo build-pairs``)."""

    # {score key or bare dimension: {min, max, weight, divide_by}}; default VideoDPO's VBench quality set.
    quality: dict[str, Optional[NormSpec]] = Field(default_factory=lambda: {k: None for k in VBENCH_QUALITY})
    # Same for the semantic set; {} makes OmniScore = Quality. Default VBench overall_consistency.
    semantic: dict[str, Optional[NormSpec]] = Field(default_factory=lambda: {k: None for k in VBENCH_SEMANTIC})
    quality_weight: float = Field(4.0, ge=0)
    semantic_weight: float = Field(1.0, ge=0)
    # A configured key no reward provides: "error" (default) or "skip" it.
    on_missing: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _check(self) -> "OmniScoreConfig":
        if not self.quality:
            raise ValueError("`quality` is empty; OmniScore needs at least one quality key")
        if self.semantic and self.quality_weight + self.semantic_weight <= 0:
            raise ValueError("quality_weight + semantic_weight must be positive")
        for table in (self.quality, self.semantic):
            for key, spec in table.items():
                (spec or NormSpec()).resolved(key)  # max > min
        return self


class OmniScoreSelectorConfig(OmniScoreConfig):
    """Spec section of ``selector: {type: omniscore}`` (OmniScore keys plus the pair filters)."""

    # Keep this fraction of pairs, those with the largest OmniScore gaps (VideoDPO: 0.75).
    keep_top_fraction: float = Field(0.75, gt=0, le=1)
    # Keep a pair only if winner > mean OmniScore (over all videos of the call / dataset) > loser.
    require_mean_split: bool = False
    # A pair needs gap > min_gap (0: only exact ties are dropped).
    min_gap: float = Field(0.0, ge=0)
    # Re-weighting exponent (0: every weight 1) and its reference pair score. With alpha != 0 a pair with an
    # OmniScore <= 0 is skipped (counted); weights are capped at max_weight (null: no cap).
    alpha: float = 0.0
    weight_reference: float = Field(0.72, gt=0)
    max_weight: Optional[float] = Field(DEFAULT_MAX_WEIGHT, gt=0)


class VideoDPOConfig(ObjectiveConfig):
    """Spec section of ``objective: {type: videodpo_dpo}``."""

    requires: ClassVar[str] = "pairs"

    beta: float = Field(5000.0, gt=0)
    # Same timestep and noise for winner and loser (Diffusion-DPO); false: independent (VideoDPO's code).
    shared_noise: bool = True
    # Re-weight pairs as (weight_reference / (s_w * s_l)) ** alpha from stored OmniScores ("vpo") or
    # pair.json "score" ("videodpo"). null: keep the weights stored by the build ("vpo"), 1 ("videodpo").
    alpha: Optional[float] = None
    weight_reference: float = Field(0.72, gt=0)
    # Cap on a pair's weight (null: none). A pair with an OmniScore (or pair.json score) <= 0 is skipped.
    max_weight: Optional[float] = Field(DEFAULT_MAX_WEIGHT, gt=0)
    # pairs_format "videodpo": clip decoding. null frames/height/width: the policy's own.
    clip_frames: Optional[int] = Field(None, ge=1)
    clip_stride: int = Field(4, ge=1)
    clip_height: Optional[int] = Field(None, ge=1)
    clip_width: Optional[int] = Field(None, ge=1)
    # Where encoded latents are cached; null: OUTPUT_DIR/videodpo-latents (the run's directory). Never inside
    # the data set, which may be read-only or shared.
    cache_dir: Optional[str] = None
    # Drop pairs with a clip shorter than this (seconds, metadata's clip_duration).
    min_clip_duration: float = Field(0.0, ge=0)
    # clip_path entries must lie inside data.pairs; true also accepts ".." and absolute paths outside it.
    allow_outside_paths: bool = False
    # Drop repeated pairs (same winner clip, loser clip and prompt); self-pairs are always dropped.
    drop_duplicate_pairs: bool = True
    # Decode every clip that is not cached yet when the data set is opened, so a broken clip stops the run
    # before training rather than at the step that needs it.
    validate_clips: bool = True
