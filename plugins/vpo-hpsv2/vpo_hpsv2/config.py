"""Config model of the ``hpsv2`` reward (light: no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from vpo_core import RewardConfig

HPSV2_REPO = "xswu/HPSv2"
CHECKPOINT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2Config(RewardConfig):
    differentiable: ClassVar[bool] = True  # preprocessing and CLIP are torch ops: gradients reach the frames

    # Hub repo of the original checkpoints (xswu/HPSv2, file picked by `version`), a local .pt file, or a
    # converted CLIPModel directory / hub repo (written by vpo-hpsv2-convert, or e.g. adams-story/HPSv2-hf).
    model: str = HPSV2_REPO
    version: Literal["v2.0", "v2.1"] = "v2.1"
    # None: the converted directory's own tokenizer if it has one, else the ViT-H-14 tokenizer of LAION.
    tokenizer: str | None = None
    # Frames scored per video, sampled uniformly over time; "all" scores every frame.
    num_frames: int | Literal["all"] = 8
    # Images (frames) per forward pass of the vision tower.
    micro_batch_size: int = 8
    # None: the model's own input size (224 for HPSv2).
    image_size: int | None = None
    # None: the run's device (BuildContext.device).
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Head counts are not stored in open_clip checkpoints; None uses ViT-H-14's (16 and 16).
    vision_heads: int | None = None
    text_heads: int | None = None

    def score_dimensions(self) -> list[str]:
        return ["score"]
