"""Config model of the ``videocrafter2`` policy (one spec section, validated by pydantic)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator
from vpo_core import LoraSpec as BaseLoraSpec, PolicyConfig

DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class LoraSpec(BaseLoraSpec):
    """LoRA adapter on the UNet (peft ``LoraConfig``). VADER's targets: every attention's to_q / to_k / to_v
    (spatial, cross, temporal and init_attn), rank 16."""

    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v"])


class VideoCrafter2Config(PolicyConfig):
    """Spec section of ``type: videocrafter2``."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"trajectories"})

    # Hub id (downloads model.safetensors if the repo has one, else model.ckpt), a local model.ckpt, or what
    # `vpo videocrafter2 convert` wrote (a .safetensors file or a directory holding model.safetensors).
    model: str = "VideoCrafter/VideoCrafter2"
    revision: str | None = None
    tokenizer: str = DEFAULT_TOKENIZER  # OpenCLIP ViT-H/14's tokenizer (hub id or directory)
    # Dtype of the frozen parts (VAE, text encoder, and the UNet's base weights under LoRA).
    # None: follow the run's mixed_precision (bf16 -> bfloat16, fp16 -> float16, no -> float32).
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None  # None: the run's device (BuildContext.device)

    lora: LoraSpec = Field(default_factory=LoraSpec)
    full_finetune: bool = False  # train every UNet weight instead of a LoRA adapter (VideoDPO)
    gradient_checkpointing: bool = False  # per UNet block, in losses and gradient windows
    temporal_conv_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # LVDM's hard-coded 0.1; active in train mode only

    # Sampling (LVDM's DDIM sampler)
    num_inference_steps: int = Field(50, ge=1, le=1000)  # uniform spacing 1000 // steps (30 gives 31 steps, as LVDM)
    eta: float = Field(1.0, ge=0.0)  # LVDM's default: DDPM-like noise at every step
    guidance_scale: float = 12.0  # > 1 enables classifier-free guidance against the "" prompt's embedding
    negative_prompt: str = ""
    fps: int = Field(28, ge=1)  # fps conditioning while sampling (VideoCrafter's inference script: 28; VADER: 24)
    loss_fps: int | None = Field(None, ge=1)  # fps in denoising_loss; None: `fps` (VideoDPO's training passes none: 16)
    num_frames: int = Field(16, ge=1)
    height: int = Field(320, ge=8)
    width: int = Field(512, ge=8)
    micro_batch_size: int = Field(1, ge=1)  # rows denoised together (x2 with CFG)
    vae_micro_batch_size: int = Field(16, ge=1)  # frames per VAE decode / encode call
    text_cache_size: int = Field(1024, ge=0)  # prompt embeddings kept (LRU); 0 disables the cache

    @field_validator("num_inference_steps")
    @classmethod
    def _inside_the_schedule(cls, value: int) -> int:
        if 999 % (1000 // value) == 0:  # range(0, 1000, 1000 // steps) + 1 would reach timestep 1000
            raise ValueError(f"LVDM's uniform DDIM timesteps for {value} steps end at timestep 1000, beyond its "
                             f"1000-step schedule (LVDM itself fails there); choose another count, e.g. {value + 1}")
        return value

    @field_validator("height", "width")
    @classmethod
    def _divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be divisible by 8 (the SD VAE downsamples by 8), got {value}")
        return value
