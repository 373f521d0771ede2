"""Config models of the ``best_worst`` selector and the ``dpo`` objective (light: no torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from vpo_core import ObjectiveConfig, SelectorConfig


class BestWorstConfig(SelectorConfig):
    # Score key "<reward name>.<dimension>", or "total" (the spec's weighted sum over rewards).
    key: str = "total"
    # Composite ranking score sum_k w_k * s_k over several keys; replaces `key` when set.
    weights: dict[str, float] | None = None
    # Per-key normalisation before weighting, across all P*N candidates of the step: "none" keeps raw
    # scores (so weights must account for scale), "zscore" uses (s - mean) / std (std 0 -> all zeros).
    normalize: Literal["none", "zscore"] = "none"
    # A prompt gives a pair only when best - worst > min_gap (equal scores never make a pair).
    min_gap: float = Field(0.0, ge=0.0)
    mode: Literal["best_worst", "all_pairs"] = "best_worst"

    @model_validator(mode="after")
    def _key_or_weights(self) -> "BestWorstConfig":
        if self.weights is not None:
            if not self.weights:
                raise ValueError("`weights` is empty; give {score key: weight} or remove it to rank by `key`")
            if self.key != "total":
                raise ValueError("set either `key` (one score) or `weights` (a composite), not both")
        return self

    def score_keys(self) -> list[str]:
        return list(self.weights) if self.weights is not None else [self.key]


class DPOConfig(ObjectiveConfig):
    beta: float = Field(5000.0, gt=0)  # Diffusion-DPO / VideoDPO value
    # Same timestep and noise for winner and loser (Diffusion-DPO; lower variance). False: independent
    # draws, as VideoDPO's code does.
    shared_noise: bool = True
    reference_update_every: int = Field(200, ge=0)  # K; 0 = fixed reference
