"""Config model of the ``cogvideox`` policy (one spec section, validated by pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from vpo_core import PartConfig
from vpo_core.adapters import LoraSpec as BaseLoraSpec


class LoraSpec(BaseLoraSpec):
    """LoRA adapter on the transformer (peft ``LoraConfig``)."""

    # CogVideoX attention projections (diffusers module names), as in diffusers' CogVideoX LoRA script.
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class CogVideoXConfig(PartConfig):
    """Spec section of ``type: cogvideox``."""

    # Hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b) or a local directory in diffusers layout.
    model: str = "THUDM/CogVideoX-2b"
    revision: str | None = None
    # Dtype of the frozen parts (VAE, T5, and the transformer's base weights under LoRA).
    # None: follow the run's mixed_precision (bf16 -> bfloat16, fp16 -> float16, no -> float32).
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None  # None: the run's device (BuildContext.device)

    lora: LoraSpec = Field(default_factory=LoraSpec)
    full_finetune: bool = False  # train every transformer weight instead of a LoRA adapter
    gradient_checkpointing: bool = False  # diffusers' per-block checkpointing of the transformer

    # Sampling
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = 6.0  # > 1 enables classifier-free guidance
    use_dynamic_cfg: bool = False
    num_frames: int = Field(49, ge=1)
    height: int = Field(480, ge=8)
    width: int = Field(720, ge=8)
    micro_batch_size: int = Field(1, ge=1)  # rows denoised together (x2 with CFG)
    negative_prompt: str = ""
    # T5 tokens prompts are padded to; None = the transformer's max_text_seq_length (226 for CogVideoX)
    max_sequence_length: int | None = Field(None, ge=1)
    text_cache_size: int = Field(1024, ge=0)  # prompt embeddings kept (LRU); 0 disables the cache

    # Memory
    vae_slicing: bool = True  # decode one video at a time
    vae_tiling: bool = False  # decode in spatial tiles (large resolutions)
    attention: Literal["sdpa", "xformers"] = "sdpa"

    @field_validator("height", "width")
    @classmethod
    def _divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be divisible by 8 (CogVideoX's VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _frames_fit_vae(self) -> "CogVideoXConfig":
        # Published CogVideoX VAEs compress time by 4; the policy re-checks against the loaded VAE.
        if (self.num_frames - 1) % 4:
            raise ValueError(
                f"num_frames={self.num_frames} does not fit CogVideoX's VAE: num_frames - 1 must be divisible by "
                "its temporal compression 4 (e.g. 9, 17, 49)"
            )
        return self
