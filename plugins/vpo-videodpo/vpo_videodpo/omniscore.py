"""OmniScore (VideoDPO): one number per video from many reward dimensions.

For every configured key ``k`` (a score key ``"<reward>.<dim>"``, or a bare ``dim`` matched against the
score keys' suffixes)::

    norm_k    = (raw_k / divide_by_k - min_k) / (max_k - min_k)
    Quality   = sum_k w_k * norm_k / sum_k w_k          over the quality keys
    Semantic  = the same over the semantic keys
    OmniScore = (qw * Quality + sw * Semantic) / (qw + sw)   VideoDPO: qw = 4, sw = 1
              = Quality when no semantic key is configured (or found, with on_missing: skip)

A key's ``min``/``max``/``weight``/``divide_by`` left unset take VBench's values when the dimension name
(the part after the last ".") is a VBench dimension (table below, as in VideoDPO's OmniScore code), else
``[0, 1]``, weight 1, divide_by 1. Normalised values are not clipped (VideoDPO does not clip either).
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from vpo_core import RunError, SelectorConfig

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


NormTable = Mapping[str, Optional[NormSpec]]


def _as_specs(table: Mapping[str, object] | None) -> dict[str, NormSpec]:
    out = {}
    for key, spec in (table or {}).items():
        out[key] = spec if isinstance(spec, NormSpec) else NormSpec.model_validate(spec or {})
    return out


def resolve_key(key: str, available: list[str] | tuple[str, ...]) -> str | None:
    """The score key ``key`` stands for: itself, else the one key ending in ``"." + key``; None if absent."""
    if key in available:
        return key
    matches = [k for k in available if k.endswith("." + key)]
    if len(matches) > 1:
        raise RunError(f"OmniScore key '{key}' is ambiguous: several rewards give it ({', '.join(matches)}); "
                       f"write the full key '<reward name>.{key}' in `quality:` / `semantic:`")
    return matches[0] if matches else None


def _group_score(scores: Mapping[str, torch.Tensor], table: dict[str, NormSpec], group: str,
                 on_missing: str) -> torch.Tensor | None:
    total, weights = None, 0.0
    missing = []
    for key, spec in table.items():
        found = resolve_key(key, tuple(scores))
        if found is None:
            missing.append(key)
            continue
        low, high, weight, divide_by = spec.resolved(key)
        norm = (scores[found].detach().double() / divide_by - low) / (high - low)  # float64: exact ranking
        total = weight * norm if total is None else total + weight * norm
        weights += weight
    if missing and on_missing == "error":
        raise RunError(
            f"OmniScore {group} key(s) {missing} match no score; available keys: {sorted(scores)}. Map them to "
            f"your rewards' dimensions in `{group}:` (e.g. 'vb.temporal_flickering') or set `on_missing: skip`")
    if total is None:
        return None
    if weights <= 0:
        raise RunError(f"OmniScore {group} weights sum to 0; give at least one key a positive weight")
    return total / weights


def omniscore_parts(scores: Mapping[str, torch.Tensor], quality: Mapping[str, object] | None = None,
                    semantic: Mapping[str, object] | None = None, quality_weight: float = 4.0,
                    semantic_weight: float = 1.0, on_missing: Literal["error", "skip"] = "error"
                    ) -> dict[str, torch.Tensor]:
    """``{"omniscore", "quality"[, "semantic"]}``, each shaped like the input scores.

    ``quality`` / ``semantic``: ``{key: NormSpec | dict | None}``; None means VideoDPO's VBench sets.
    """
    q_table = _as_specs({k: None for k in VBENCH_QUALITY} if quality is None else quality)
    s_table = _as_specs({k: None for k in VBENCH_SEMANTIC} if semantic is None else semantic)
    q = _group_score(scores, q_table, "quality", on_missing)
    if q is None:
        raise RunError(f"OmniScore: none of the quality keys {list(q_table)} match a score "
                       f"(available: {sorted(scores)}); map them to your rewards' dimensions in `quality:`")
    out = {"quality": q}
    s = _group_score(scores, s_table, "semantic", on_missing) if s_table else None
    if s is None:
        out["omniscore"] = q
    else:
        out["semantic"] = s
        out["omniscore"] = (quality_weight * q + semantic_weight * s) / (quality_weight + semantic_weight)
    return out


def omniscore(scores: Mapping[str, torch.Tensor], quality: Mapping[str, object] | None = None,
              semantic: Mapping[str, object] | None = None, quality_weight: float = 4.0,
              semantic_weight: float = 1.0, on_missing: Literal["error", "skip"] = "error") -> torch.Tensor:
    """OmniScore of every video: ``scores[key]`` of any shape (``[N]``, ``[P, N]``) -> the same shape."""
    return omniscore_parts(scores, quality, semantic, quality_weight, semantic_weight, on_missing)["omniscore"]


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


class OmniScore:
    """``OmniScore(config)(scores) -> Tensor``; ``parts(scores)`` also gives Quality and Semantic."""

    def __init__(self, config: OmniScoreConfig | None = None) -> None:
        self.config = config or OmniScoreConfig()

    def parts(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        return omniscore_parts(scores, c.quality, c.semantic, c.quality_weight, c.semantic_weight, c.on_missing)

    def __call__(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.parts(scores)["omniscore"]
