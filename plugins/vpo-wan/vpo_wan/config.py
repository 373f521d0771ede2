"""Config model of the ``wan`` policy (one spec section, validated by pydantic)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from vpo_core import LoraSpec as BaseLoraSpec
from vpo_core.diffusers_policy import DiffusersPolicyConfig, DtypeName


class LoraSpec(BaseLoraSpec):
    """LoRA adapter on the transformer(s) (peft ``LoraConfig``)."""

    # Every WanTransformerBlock's self- and cross-attention projections and its feed-forward layers.
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])


class WanConfig(DiffusersPolicyConfig):
    """Spec section of ``type: wan``; the shared keys are documented on ``DiffusersPolicyConfig``."""

    # Hub id (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B-, Wan2.2-TI2V-5B-, Wan2.2-T2V-A14B-Diffusers) or a local directory.
    model: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    # Which Wan 2.2 A14B expert(s) train: the high-noise `transformer` (t >= boundary), the low-noise `transformer_2`,
    # or both. Sampling always uses both, as the stock pipeline does. One-transformer checkpoints: `all`.
    experts: Literal["all", "high_noise", "low_noise"] = "all"
    vae_dtype: DtypeName = "float32"  # diffusers' Wan docs recommend a float32 VAE for decoding quality

    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None  # A14B low-noise expert; None: guidance_scale (as stock)
    num_frames: int = Field(81, ge=1)
    height: int = Field(480, ge=16)
    width: int = Field(832, ge=16)
    max_sequence_length: int = Field(512, ge=1)  # UMT5 tokens, as WanPipeline
    # Sampler: the checkpoint's own (UniPC for the Wan-AI repositories), or UniPC / flow-matching Euler with
    # `flow_shift` (None: the checkpoint's; Wan's docs: 3.0 for 480p, 5.0 for 720p).
    scheduler: Literal["checkpoint", "unipc", "euler"] = "checkpoint"
    flow_shift: float | None = Field(None, gt=0)
    # Training sigmas (denoising loss): the shift of DiffSynth-Studio's Wan training schedule (see sample_timesteps).
    training_shift: float = Field(5.0, gt=0)
    size_multiple: ClassVar[int] = 16  # WanPipeline's requirement
