"""The ``videoscore`` reward: config, checkpoint detection, and batched differentiable scoring."""

from __future__ import annotations

import torch
from vpo_core import BuildContext, iter_chunks

from . import idefics2, qwen2_vl
from .common import DIMENSIONS, CheckpointError, check_source, read_json
from .config import VideoScoreConfig

# config.json model_type -> (variant, architecture the published checkpoint declares)
VARIANTS = {
    "idefics2": ("idefics2", idefics2.ARCHITECTURE),
    "qwen2_vl": ("qwen2vl", qwen2_vl.ARCHITECTURE),
}
SCORERS = {"idefics2": idefics2.Idefics2Scorer, "qwen2vl": qwen2_vl.Qwen2VLScorer}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_variant(model: str, revision: str | None, requested: str) -> str:
    """Variant of a checkpoint from its config.json; a clear error for anything that is not VideoScore."""
    check_source(model)
    config = read_json(model, "config.json", revision, required=True)
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in VARIANTS:
        raise CheckpointError(
            f"{model} is not a VideoScore checkpoint: config.json has model_type={model_type!r}, expected "
            f"'idefics2' (TIGER-Lab/VideoScore, VideoScore-v1.1) or 'qwen2_vl' (TIGER-Lab/VideoScore-Qwen2-VL)."
        )
    variant, architecture = VARIANTS[model_type]
    if architecture not in architectures:
        raise CheckpointError(
            f"{model} is a {model_type} model but not a VideoScore regression checkpoint: config.json "
            f"architectures={architectures}, expected [{architecture!r}]."
        )
    if requested != "auto" and requested != variant:
        raise CheckpointError(f"variant={requested!r} was set but {model} is a {variant!r} checkpoint.")
    return variant


def default_num_frames(model: str, variant: str) -> int | None:
    # VideoScore-v1.1 was trained on 48 frames, VideoScore (v1) on 16; config.json does not tell v1 from v1.1,
    # so the name decides. Qwen2-VL: None, the frame count follows from the clip's length and video_fps.
    if variant == "qwen2vl":
        return None
    return 48 if "v1.1" in model.lower() else 16


class VideoScoreReward:
    """VideoScore regression scores (≈1–4 per dimension, higher is better), differentiable in the pixels."""

    differentiable = True

    def __init__(self, config: VideoScoreConfig, context: BuildContext):
        self.config = config
        self.device = torch.device(config.device) if config.device else torch.device(context.device)
        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.variant = detect_variant(config.model, config.revision, config.variant)
        self.num_frames = config.num_frames or default_num_frames(config.model, self.variant)
        extra = {"min_pixels": config.min_pixels, "max_pixels": config.max_pixels} if self.variant == "qwen2vl" else {}
        extra["device_map"] = str(self.device)  # load straight onto the device, no CPU copy of 8B weights
        self.scorer = SCORERS[self.variant].from_pretrained(config.model, config.revision, DTYPES[dtype], **extra)
        num_labels = self.scorer.model.config.num_labels
        if num_labels != len(DIMENSIONS):
            raise CheckpointError(
                f"{config.model}: the head has {num_labels} outputs, VideoScore has {len(DIMENSIONS)} "
                f"({', '.join(DIMENSIONS)})."
            )
        self.selected = config.selected_dimensions()
        self.weights = config.weights
        self.dimensions = self.selected + (("weighted",) if self.weights else ())

    def frame_indices(self, total: int) -> list[int]:
        """The frames of a ``total``-frame clip that the model sees, chosen as the variant's release does."""
        if self.variant == "qwen2vl":
            return qwen2_vl.frame_indices(total, self.config.video_fps, self.num_frames)
        return idefics2.frame_indices(total, self.num_frames)

    def sample_frames(self, frames: torch.Tensor) -> torch.Tensor:
        indices = self.frame_indices(frames.shape[1])
        if indices == list(range(frames.shape[1])):
            return frames
        return frames[:, torch.tensor(indices, device=frames.device)]

    def raw_scores(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B,T,C,H,W]`` in [0,1] -> head outputs ``[B, 5]`` (float32), in micro-batches."""
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B,T,3,H,W] in [0,1], got shape {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise ValueError(f"{frames.shape[0]} videos but {len(prompts)} prompts")
        frames = self.sample_frames(frames)
        chunks = [
            self.scorer(frames[rows], prompts[rows]).float()
            for rows in iter_chunks(frames.shape[0], self.config.micro_batch_size)
        ]
        return torch.cat(chunks).to(frames.device)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raw = self.raw_scores(frames, prompts)
        by_name = {name: raw[:, i] for i, name in enumerate(DIMENSIONS)}
        scores = {name: by_name[name] for name in self.selected}
        if self.weights:
            scores["weighted"] = sum(w * by_name[name] for name, w in self.weights.items())
        return scores


def build(config: VideoScoreConfig, context: BuildContext) -> VideoScoreReward:
    return VideoScoreReward(config, context)
