"""VideoScore-Qwen2-VL: Qwen2-VL-7B with a 5-output regression head.

The published checkpoint was written by ``mantis.models.qwen2_vl.Qwen2VLForSequenceClassification`` in the
pre-transformers-5 layout: ``visual.*`` (vision tower), ``model.*`` (text decoder), ``score.*`` (head). In
transformers 5 the tower and decoder live under ``model.visual`` / ``model.language_model``; ``KEY_MAPPING`` is
passed to ``from_pretrained`` to rename them on load (checkpoints already in the new layout load unchanged).

Mantis' forward ran the text decoder without ``position_ids``, which old transformers filled with plain 1-D
positions for all three M-RoPE sections; the published scores therefore come from 1-D positions, and so do
ours (transformers 5 would otherwise compute M-RoPE, which needs ``mm_token_type_ids``, and shift the scores).

Preprocessing is done with torch ops: the transformers Qwen2-VL *video* processor needs torchvision, which
cannot be imported next to a CPU torch build, and torch ops keep the scores differentiable in the pixels.
It follows the official example (``qwen_vl_utils.fetch_video`` + ``Qwen2VLProcessor``): resize each frame
with bicubic antialias to a multiple of ``patch_size * merge_size`` inside the pixel budget, rescale,
CLIP mean/std, group ``temporal_patch_size`` frames per patch, and one ``<|video_pad|>`` per merged patch in
Qwen2-VL's chat template.

Frames are chosen as the official example does (``"fps": 8.0`` through ``qwen_vl_utils`` 0.0.8, the release
current when VideoScore-Qwen2-VL was published in November 2024): ``frame_indices`` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel, Qwen2VLPreTrainedModel

from .common import REGRESSION_QUERY_PROMPT, CheckpointError, last_token_index, load_model, read_json, right_pad

ARCHITECTURE = "Qwen2VLForSequenceClassification"
VIDEO_TOKEN = "<|video_pad|>"
# Old (Mantis / transformers 4.x) key layout -> transformers 5 layout.
KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!visual\.|language_model\.)": "model.language_model.",
}
# qwen_vl_utils' per-frame pixel budget for videos (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# qwen_vl_utils 0.0.8 frame sampling, with the rate the VideoScore example asks for.
SAMPLE_FPS = 8.0  # FPS in TIGER-AI-Lab/VideoScore examples/run_videoscore_qwen2_vl.py
FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 4, 768
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Qwen2VLForSequenceClassification(Qwen2VLPreTrainedModel):
    """Qwen2-VL + linear regression head pooled at the last non-padding token (Mantis' class)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2VLModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
        # 1-D positions, as the published model was run (see the module docstring).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions.unsqueeze(0).expand(3, -1, -1),
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            use_cache=False,
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score(hidden[rows, last_token_index(attention_mask)])


def frame_indices(total: int, video_fps: float, num_frames: int | None = None) -> list[int]:
    """Frames of a ``total``-frame clip at ``video_fps`` that ``qwen_vl_utils`` 0.0.8 feeds the model.

    ``smart_nframes``: n = round_by_factor(total / video_fps * SAMPLE_FPS, 2), first clamped to
    [4, floor_by_factor(min(768, total), 2)] (or n = round_by_factor(num_frames, 2) when a count is given, its
    ``nframes`` option); then frames ``linspace(0, total - 1, n).round()`` (float32, ties to even). Releases from
    0.0.10 floor instead of rounding; the two agree whenever the clamp to the clip's length applies. Where the
    release refuses a clip (n outside [2, total]) we clamp n into that range, and a clip of one frame is fed whole.
    """
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        max_frames = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total / video_fps * SAMPLE_FPS, min_frames), max_frames)
        n = round(n / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(n, FRAME_FACTOR), total // FRAME_FACTOR * FRAME_FACTOR)
    if n < FRAME_FACTOR:
        return list(range(total))
    return torch.linspace(0, total - 1, n, dtype=torch.float32).round().long().tolist()


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect kept."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def build_prompt(prompt: str, num_video_tokens: int) -> str:
    """Qwen2-VL's default chat template for one user turn [video, text] plus the generation prompt."""
    video = f"<|vision_start|>{VIDEO_TOKEN * num_video_tokens}<|vision_end|>"
    query = REGRESSION_QUERY_PROMPT.format(text_prompt=prompt)
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{video}{query}<|im_end|>\n<|im_start|>assistant\n"
    )


@dataclass
class VisionSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS

    @classmethod
    def from_checkpoint(cls, source, revision, min_pixels=None, max_pixels=None) -> "VisionSettings":
        cfg = read_json(source, "preprocessor_config.json", revision) or {}
        return cls(
            patch_size=int(cfg.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", cls.merge_size)),
            mean=tuple(cfg.get("image_mean", cls.mean)),
            std=tuple(cfg.get("image_std", cls.std)),
            min_pixels=min_pixels or cls.min_pixels,
            max_pixels=max_pixels or cls.max_pixels,
        )


class Qwen2VLScorer(nn.Module):
    """frames ``[B,T,C,H,W]`` in [0,1] (T already sampled) + prompts -> raw head outputs ``[B, num_labels]``."""

    def __init__(self, model: Qwen2VLForSequenceClassification, tokenizer, settings: VisionSettings):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        if token_id != model.config.video_token_id:
            raise CheckpointError(
                f"the tokenizer maps {VIDEO_TOKEN} to {token_id} but config.video_token_id is "
                f"{model.config.video_token_id}; tokenizer and model come from different checkpoints."
            )

    @classmethod
    def from_pretrained(cls, source, revision, dtype, min_pixels=None, max_pixels=None, **kwargs) -> "Qwen2VLScorer":
        model = load_model(
            Qwen2VLForSequenceClassification, source, revision, dtype, key_mapping=KEY_MAPPING, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        return cls(model, tokenizer, VisionSettings.from_checkpoint(source, revision, min_pixels, max_pixels))

    def video_inputs(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,T,C,H,W]`` in [0,1] -> (``pixel_values_videos`` ``[B*N, C*tp*p*p]``, ``video_grid_thw`` ``[B,3]``)."""
        s = self.settings
        if pad := -frames.shape[1] % s.temporal_patch_size:  # as the processor: repeat the last frame
            frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        b, t, c, h, w = frames.shape
        size = smart_resize(h, w, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
        x = frames.reshape(b * t, c, h, w)
        if size != (h, w):
            # The reference resizes uint8 frames, which clips bicubic overshoot to the valid range.
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(s.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(s.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
        grid_t, grid_h, grid_w = t // tp, size[0] // p, size[1] // p
        x = x.reshape(b, grid_t, tp, c, grid_h // m, m, p, grid_w // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(b * grid_t * grid_h * grid_w, c * tp * p * p)
        grid = torch.tensor([[grid_t, grid_h, grid_w]] * b, device=x.device)
        return x, grid

    def text_inputs(self, prompts: list[str], num_video_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tokenizer(build_prompt(p, num_video_tokens))["input_ids"] for p in prompts]
        return right_pad(ids, self.tokenizer.pad_token_id, device)

    def forward(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.model.device
        pixel_values_videos, grid = self.video_inputs(frames.to(device))
        num_video_tokens = int(grid[0].prod()) // self.settings.merge_size**2
        input_ids, attention_mask = self.text_inputs(prompts, num_video_tokens, device)
        return self.model(input_ids, attention_mask, pixel_values_videos, grid)
