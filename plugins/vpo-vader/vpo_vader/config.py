"""Config model of the ``reward_gradient`` objective (light: no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from vpo_core import ObjectiveConfig


class RewardShape(BaseModel):
    """How one score key turns into a loss."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["maximize", "target"] = "maximize"
    target: float = 10.0  # mode target only
    scale: float = Field(1.0, gt=0)


class RewardGradientConfig(ObjectiveConfig):
    requires: ClassVar[str] = "rollout"

    # Which denoising steps carry gradient: "last" = the final step only (VADER's default), "last_k" = the
    # final `last_steps` steps, "random" = the final k steps with k uniform in [1, last_steps] per rollout.
    cutoff: Literal["last", "last_k", "random"] = "last"
    last_steps: int = Field(1, ge=1)
    # Latent frames decoded for the rewards: all of them, every n-th (0, n, 2n, ...), or one drawn at random
    # per micro-step (VADER's choice for image rewards such as HPS / aesthetics).
    frames: Literal["all", "every_nth", "one_random"] = "all"
    every_n: int = Field(2, ge=1)
    # {score key: shape}; keys are "<reward name>.<dimension>" or "total" (the spec's weighted sum).
    rewards: dict[str, RewardShape] = Field(default_factory=lambda: {"total": RewardShape()})
    # Recompute the window's activations in the backward pass (GradientWindow.checkpointing).
    gradient_checkpointing: bool = True
    # Keep the saved activations in (pinned) CPU memory until the backward pass: torch's save_on_cpu.
    offload_activations: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "RewardGradientConfig":
        if self.cutoff == "last" and self.last_steps != 1:
            raise ValueError(f"cutoff 'last' keeps the final step only, but last_steps={self.last_steps}; "
                             f"use cutoff 'last_k' (exactly K steps) or 'random' (1..K steps)")
        if not self.rewards:
            raise ValueError("`rewards` is empty; name at least one score key, e.g. {total: {mode: maximize}}")
        return self

    def score_keys(self) -> list[str]:
        return list(self.rewards)
