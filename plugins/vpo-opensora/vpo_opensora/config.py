"""Config model of the ``opensora`` policy (one spec section, validated by pydantic)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from vpo_core import PolicyConfig
from vpo_core import LoraSpec as BaseLoraSpec


class LoraSpec(BaseLoraSpec):
    """LoRA adapter on STDiT3 (peft ``LoraConfig``); names are Open-Sora's module names, matched as suffixes."""

    # Attention and MLP projections of every spatial and temporal block. VADER's Open-Sora run used
    # [qkv, q_linear, kv_linear] only.
    target_modules: list[str] = Field(default_factory=lambda: [
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1",
        "mlp.fc2"])


class OpenSoraConfig(PolicyConfig):
    """Spec section of ``type: opensora`` (Open-Sora v1.2: STDiT3 + video VAE + T5-XXL, rectified flow)."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"trajectories"})

    # Hub ids or local directories in the published layouts (see README).
    model: str = "hpcai-tech/OpenSora-STDiT-v3"
    vae: str = "hpcai-tech/OpenSora-VAE-v1.2"
    text_encoder: str = "DeepFloyd/t5-v1_1-xxl"
    # Dtype of the frozen parts (VAE, T5, and STDiT3's base weights under LoRA).
    # None: follow the run's mixed_precision (bf16 -> bfloat16, fp16 -> float16, no -> float32).
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None  # None: the run's device (BuildContext.device)

    lora: LoraSpec = Field(default_factory=LoraSpec)
    full_finetune: bool = False  # train every STDiT3 weight instead of a LoRA adapter
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass

    # Sampling: Open-Sora v1.2's inference config (configs/opensora-v1-2/inference/sample.py: 240p 9:16, "2s").
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = 7.0  # > 1 enables classifier-free guidance with the learned null caption
    num_frames: int = Field(51, ge=1)  # 1 (an image) or >= 17; chunks of 17 frames -> 5 latent frames
    # Requested size in pixels, as Open-Sora's resolution buckets give it (240p 9:16 = 240 x 426). The model is
    # conditioned on it; the VAE makes frames of 8 * (size // 8) pixels (240 x 424 here), as in the original.
    height: int = Field(240, ge=16)
    width: int = Field(426, ge=16)
    fps: int = Field(24, ge=1)  # conditioning; images (num_frames 1) use 120 as the original does
    aesthetic_score: float | None = 6.5  # appended to prompts as " aesthetic score: 6.5." (null: no suffix)
    motion_score: float | None = None  # " motion score: X." (the release leaves it off)
    micro_batch_size: int = Field(1, ge=1)  # rows denoised together (x2 with CFG)
    vae_micro_batch_size: int = Field(4, ge=1)  # frames per 2-D VAE call (the original's micro_batch_size)
    text_cache_size: int = Field(1024, ge=0)  # prompt embeddings kept (LRU); 0 disables the cache

    @model_validator(mode="after")
    def _frames_fit_vae(self) -> "OpenSoraConfig":
        if 1 < self.num_frames < 17:
            raise ValueError(
                f"num_frames={self.num_frames}: Open-Sora v1.2 takes 1 frame (an image) or at least 17 (its timestep "
                "transform scales with (num_frames // 17) * 5, which is 0 below 17); e.g. 17, 34, 51, 68, 102")
        return self
