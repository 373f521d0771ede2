"""VideoScore / VideoScore-v1.1: Mantis-8B-Idefics2 with a 5-output regression head.

The published checkpoints were written by ``mantis.models.idefics2.Idefics2ForSequenceClassification``
(``model.*`` = transformers' ``Idefics2Model``, ``score.*`` = ``Linear(hidden, 5)``). The ``mantis-vl``
package pins an old transformers, so the head is rebuilt here on transformers' own Idefics2 with the same
class name and state-dict keys.

Inputs are made with torch ops only (no PIL, no torchvision) so that scores stay differentiable in the pixels.
They follow what ``Idefics2Processor`` does for the published processor config (no image splitting,
``resample=2`` bilinear, rescale, mean/std 0.5, one ``<image>`` expanded to ``image_seq_len`` tokens).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer
from transformers.models.idefics2.modeling_idefics2 import Idefics2Model, Idefics2PreTrainedModel

from .common import REGRESSION_QUERY_PROMPT, CheckpointError, last_token_index, load_model, read_json, right_pad

ARCHITECTURE = "Idefics2ForSequenceClassification"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"


class Idefics2ForSequenceClassification(Idefics2PreTrainedModel):
    """Idefics2 + linear regression head pooled at the last non-padding token (Mantis' class, same keys)."""

    def __init__(self, config):
        super().__init__(config)
        self.model = Idefics2Model(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask, pixel_values, pixel_attention_mask=None) -> torch.Tensor:
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_attention_mask=pixel_attention_mask,
            use_cache=False,
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score(hidden[rows, last_token_index(attention_mask)])


def resize_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """Output size of Idefics2's resize: cap the longer side at ``longest_edge`` (keeping the aspect ratio),
    then raise each side independently to at least ``shortest_edge`` (as transformers'
    ``Idefics2ImageProcessor.get_resize_output_image_size`` does; it is not a plain shortest-edge resize)."""
    aspect_ratio = width / height
    if width >= height and width > longest_edge:
        width = longest_edge
        height = int(width / aspect_ratio)
    elif height > width and height > longest_edge:
        height = longest_edge
        width = int(height * aspect_ratio)
    return max(height, shortest_edge), max(width, shortest_edge)


def expand_image_tokens(text: str, image_seq_len: int) -> str:
    """The string ``Idefics2Processor`` tokenizes: each ``<image>`` becomes
    ``<fake_token_around_image>`` + ``<image>`` * image_seq_len + ``<fake_token_around_image>``."""
    image_str = f"{FAKE_IMAGE_TOKEN}{IMAGE_TOKEN * image_seq_len}{FAKE_IMAGE_TOKEN}"
    text = text.replace(IMAGE_TOKEN, image_str).replace(FAKE_IMAGE_TOKEN * 2, FAKE_IMAGE_TOKEN)
    return re.sub(rf"{re.escape(FAKE_IMAGE_TOKEN)}(?=[^\s<])", f"{FAKE_IMAGE_TOKEN} ", text)


def frame_indices(total: int, num_frames: int) -> list[int]:
    """Frames the official example (examples/run_videoscore.py) feeds: every frame of a clip of at most
    ``num_frames``, else ``np.arange(0, total, total / num_frames).astype(int)`` -- float steps, so frame
    116 rather than 117 at i = 27 of 208 / 48, and num_frames + 1 frames for a few (total, num_frames) other
    than the published 16 and 48 (computed here exactly as numpy does, start + i * step in float64)."""
    if total <= num_frames:
        return list(range(total))
    step = total / num_frames
    return [int(i * step) for i in range(math.ceil(total / step))]


def build_prompt(prompt: str, num_frames: int) -> str:
    """VideoScore's regression query followed by one ``<image>`` per frame (as in the official examples)."""
    return REGRESSION_QUERY_PROMPT.format(text_prompt=prompt) + f"{IMAGE_TOKEN} " * num_frames


@dataclass
class ImageSettings:
    shortest_edge: int = 378
    longest_edge: int = 980
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_checkpoint(cls, source: str, revision: str | None) -> "ImageSettings":
        cfg = read_json(source, "preprocessor_config.json", revision) or {}
        if cfg.get("do_image_splitting"):
            raise CheckpointError(
                f"{source}: preprocessor_config.json enables do_image_splitting; VideoScore checkpoints score "
                "frames without splitting. Use a published VideoScore checkpoint or set it to false."
            )
        size = cfg.get("size", {})
        return cls(
            shortest_edge=int(size.get("shortest_edge", cls.shortest_edge)),
            longest_edge=int(size.get("longest_edge", cls.longest_edge)),
            mean=tuple(cfg.get("image_mean", cls.mean)),
            std=tuple(cfg.get("image_std", cls.std)),
        )


class Idefics2Scorer(nn.Module):
    """frames ``[B,T,C,H,W]`` in [0,1] (T already sampled) + prompts -> raw head outputs ``[B, num_labels]``."""

    def __init__(self, model: Idefics2ForSequenceClassification, tokenizer, settings: ImageSettings):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_seq_len = model.config.perceiver_config.resampler_n_latents
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != model.config.image_token_id:
            raise CheckpointError(
                f"the tokenizer maps {IMAGE_TOKEN} to {token_id} but config.image_token_id is "
                f"{model.config.image_token_id}; tokenizer and model come from different checkpoints."
            )

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None, dtype: torch.dtype, **kwargs) -> "Idefics2Scorer":
        model = load_model(Idefics2ForSequenceClassification, source, revision, dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        processor_cfg = read_json(source, "processor_config.json", revision) or {}
        scorer = cls(model, tokenizer, ImageSettings.from_checkpoint(source, revision))
        seq_len = processor_cfg.get("image_seq_len", scorer.image_seq_len)
        if seq_len != scorer.image_seq_len:
            raise CheckpointError(
                f"{source}: processor_config.json image_seq_len={seq_len} but the perceiver has "
                f"{scorer.image_seq_len} latents."
            )
        return scorer

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B,T,C,H,W]`` in [0,1] -> normalized ``[B,T,C,H',W']`` (resize with antialias, like the processor)."""
        b, t, c, h, w = frames.shape
        s = self.settings
        size = resize_size(h, w, s.shortest_edge, s.longest_edge)
        x = frames.reshape(b * t, c, h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(s.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(s.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
        # transformers drops images whose values are all exactly 0 as batch padding; keep a uniform mid-gray
        # frame (0.5 everywhere) by nudging it off zero (1e-6, far below any visible change).
        x = x + 1e-6 * (x.flatten(1).abs().amax(1) == 0).to(x.dtype).view(-1, 1, 1, 1)
        return x.reshape(b, t, c, *size)

    def text_inputs(self, prompts: list[str], num_frames: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [expand_image_tokens(build_prompt(p, num_frames), self.image_seq_len) for p in prompts]
        ids = [self.tokenizer(text)["input_ids"] for text in texts]
        return right_pad(ids, self.tokenizer.pad_token_id, device)

    def forward(self, frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = self.model.device
        pixel_values = self.pixel_values(frames.to(device))
        input_ids, attention_mask = self.text_inputs(prompts, frames.shape[1], device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)

