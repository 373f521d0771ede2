"""Config model of the ``grpo`` objective (light: no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator
from vpo_core import ObjectiveConfig


class GRPOConfig(ObjectiveConfig):
    """``objective: {type: grpo}``. G = ``train.candidates_per_prompt`` trajectories per prompt."""

    requires: ClassVar[str] = "trajectories"

    # Stochastic sampler: Flow-GRPO's noise level for flow-matching policies, DDIM's eta for eps/v policies.
    noise_level: float = Field(0.7, gt=0)
    # Stochastic only in denoising steps [start, end) and deterministic elsewhere (MixGRPO / Flow-GRPO-Fast):
    # fewer, cheaper transitions to train. null: every step.
    sde_window: Optional[tuple[int, int]] = None
    # Fraction of a trajectory's stochastic steps trained per update; "random": a fresh subset per sample and
    # update (DDPO, DanceGRPO), "first": the first ones in denoising order (Flow-GRPO).
    timestep_fraction: float = Field(0.6, gt=0, le=1)
    timestep_order: Literal["random", "first"] = "random"
    # PPO clip range on the ratio of per-dimension-averaged transition densities (Flow-GRPO: 1e-4).
    clip_range: float = Field(1e-4, gt=0)
    # KL to the reference on the transition means (0: none).
    kl_beta: float = Field(0.0, ge=0)
    # Advantages (r - mean) / (std + 1e-4) per prompt; std over the prompt's G samples or over the whole step.
    std: Literal["per_prompt", "global"] = "per_prompt"
    adv_clip_max: float = Field(5.0, gt=0)
    # Optimizer updates made from each sampled batch (PPO epochs).
    inner_epochs: int = Field(1, ge=1)
    # {score key: weight}: the advantage is the weighted sum of each key's normalised advantage.
    rewards: dict[str, float] = Field(default_factory=lambda: {"total": 1.0})

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if not self.rewards:
            raise ValueError("`rewards` is empty; name at least one score key, e.g. {total: 1.0}")
        if self.sde_window is not None and not 0 <= self.sde_window[0] < self.sde_window[1]:
            raise ValueError(f"sde_window must be [start, end) with 0 <= start < end, got {list(self.sde_window)}")
        return self

    def score_keys(self) -> list[str]:
        return list(self.rewards)

    def updates_per_batch(self) -> int:
        return self.inner_epochs
