"""Config model of the ``cogvideox`` policy (one spec section, validated by pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from vpo_core import LoraSpec as BaseLoraSpec
from vpo_core.diffusers_policy import DiffusersPolicyConfig


class LoraSpec(BaseLoraSpec):
    """LoRA adapter on the transformer (peft ``LoraConfig``)."""

    # CogVideoX attention projections (diffusers module names), as in diffusers' CogVideoX LoRA script.
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


class CogVideoXConfig(DiffusersPolicyConfig):
    """Spec section of ``type: cogvideox``; the shared keys are documented on ``DiffusersPolicyConfig``."""

    # Hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b) or a local directory in diffusers layout.
    model: str = "THUDM/CogVideoX-2b"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    guidance_scale: float = 6.0
    use_dynamic_cfg: bool = False
    num_frames: int = Field(49, ge=1)
    height: int = Field(480, ge=8)
    width: int = Field(720, ge=8)
    # T5 tokens prompts are padded to; None = the transformer's max_text_seq_length (226 for CogVideoX)
    max_sequence_length: int | None = Field(None, ge=1)
    attention: Literal["sdpa", "xformers"] = "sdpa"
