"""Config model of the ``vjepa`` reward (light: no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from vpo_core import RewardConfig

MaskKind = Literal["temporal_block", "tubes", "random"]


class VJEPAConfig(RewardConfig):
    differentiable: ClassVar[bool] = True

    # A V-JEPA 2 checkpoint with its predictor (hub id or a save_pretrained directory).
    model: str = "facebook/vjepa2-vitl-fpc64-256"
    # Frames sampled uniformly over the video; a multiple of the model's tubelet size (2).
    num_frames: int = 16
    # Square input side; None: the checkpoint's crop_size (256). Other sizes work since positions are RoPE.
    image_size: int | None = None
    # temporal_block: a contiguous run of time steps (all spatial positions) is predicted from the rest.
    # tubes: random spatial positions, masked in every time step.  random: i.i.d. spatio-temporal tokens.
    mask: MaskKind = "temporal_block"
    # Fraction of tokens (temporal_block: of time steps; tubes: of spatial positions) that are targets.
    mask_ratio: float = 0.5
    # Masks per video; the loss is averaged over them (fewer = faster, more = lower variance).
    num_masks: int = 1
    # Seed of the masks; None: the run's seed. The same masks are drawn at every call (deterministic score).
    seed: int | None = None
    # Videos per forward pass.
    micro_batch_size: int = 2
    # None: the run's device (BuildContext.device).
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    def score_dimensions(self) -> list[str]:
        return ["temporal_consistency"]
