"""The ``toyworld`` reward: ground-truth scores for toy-world videos, differentiable and pure torch.

The prompt says what the video should show (shape colour, direction, background colour), so each dimension
compares the frames with that target directly. Notation, per video: ``x_t(p)`` is the RGB pixel ``p`` of
frame ``t`` (values in [0, 1]), ``b`` / ``o`` the prompted background / object colour, ``u`` the prompted unit
direction (image coordinates, y down).

* object mask  ``m_t(p) = sigmoid((|x_t(p) - b| - tau) / s)``, tau = 0.25, s = 0.05: soft "this pixel is not
  background". Every shape colour is >= 0.5 away from every background colour, so rendered shapes get m ~ 1.
* ``color`` in (0, 1]: mean of object match and background match,
  ``0.5 * exp(-|mean_m'(x) - o|^2 / sigma^2) + 0.5 * exp(-|mean_(1-m)(x) - b|^2 / sigma^2)``, sigma = 0.3, where
  ``mean_w`` is the w-weighted mean colour over all frames and pixels and ``m'`` is the object mask with the
  stricter threshold ``0.6 * |o - b|``: it leaves out anti-aliased edge pixels (mostly background), which
  would otherwise pull a bright shape's mean colour towards a dark background.
* ``direction`` in (0, 1): ``mean_t sigmoid(k * (c_(t+1) - c_t) . u)``, k = 60, with ``c_t`` the mask-weighted
  centroid of frame t in frame-size units. 0.5 = no motion; a shape moving the prompted way at the world's
  speed (~1.75 px / frame) scores ~0.96, the opposite way ~0.04; shuffling the frames brings it towards 0.5.
* ``flicker`` in [0, 1]: ``1 - mean |x_(t+1) - x_t|`` over pixels that are background in both frames
  (weights ``(1 - m_t)(1 - m_(t+1))``); 1 = a perfectly steady background.
* ``overall`` = ``w_c * color + w_d * direction + w_f * flicker`` with weights (0.4, 0.4, 0.2) normalised to sum
  to 1 (configurable), so it also lies in [0, 1].
"""

from __future__ import annotations

import torch
from vpo_core import VpoError

from .config import ToyWorldRewardConfig

from .world import BACKGROUND_COLORS, DIRECTIONS, SHAPE_COLORS, parse_prompt

MASK_THRESHOLD = 0.25
MASK_SOFTNESS = 0.05
COLOR_SIGMA = 0.3
CORE_FRACTION = 0.6
DIRECTION_GAIN = 60.0
EPS = 1e-6


class ToyWorldReward:
    dimensions = ("color", "direction", "flicker", "overall")
    differentiable = True

    def __init__(self, config: ToyWorldRewardConfig | None = None):
        config = config or ToyWorldRewardConfig()
        weights = torch.tensor([config.color_weight, config.direction_weight, config.flicker_weight])
        if (weights < 0).any() or weights.sum() <= 0:
            raise VpoError("toyworld reward: the weights must be >= 0 and not all 0")
        self.weights = weights / weights.sum()

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise VpoError(f"toyworld reward expects frames [B,T,3,H,W], got {tuple(frames.shape)}")
        if len(prompts) != frames.shape[0]:
            raise VpoError(f"toyworld reward got {frames.shape[0]} videos but {len(prompts)} prompts")
        targets = [parse_prompt(p) for p in prompts]
        kwargs = {"device": frames.device, "dtype": frames.dtype}
        object_color = torch.tensor([SHAPE_COLORS[a.color] for a in targets], **kwargs)  # [B, 3]
        background = torch.tensor([BACKGROUND_COLORS[a.background] for a in targets], **kwargs)
        direction = torch.tensor([DIRECTIONS[a.direction] for a in targets], **kwargs)

        mask = object_mask(frames, background)  # [B, T, H, W]
        color = color_score(frames, mask, object_color, background)
        moving = direction_score(mask, direction)
        steady = flicker_score(frames, mask)
        w = self.weights.to(**kwargs)
        overall = w[0] * color + w[1] * moving + w[2] * steady
        return {"color": color, "direction": moving, "flicker": steady, "overall": overall}


def object_mask(frames: torch.Tensor, background: torch.Tensor, threshold=MASK_THRESHOLD) -> torch.Tensor:
    """Soft mask ``[B, T, H, W]`` of pixels farther than ``threshold`` (scalar or ``[B]``) from the background."""
    distance = (frames - background.view(-1, 1, 3, 1, 1)).pow(2).sum(dim=2).add(EPS).sqrt()
    threshold = torch.as_tensor(threshold, dtype=frames.dtype, device=frames.device).reshape(-1, 1, 1, 1)
    return torch.sigmoid((distance - threshold) / MASK_SOFTNESS)


def _weighted_mean_color(frames: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean colour ``[B, 3]`` of ``frames`` under per-pixel ``weights [B, T, H, W]``."""
    total = (frames * weights.unsqueeze(2)).sum(dim=(1, 3, 4))
    return total / (weights.sum(dim=(1, 2, 3)).unsqueeze(1) + EPS)


def color_score(frames, mask, object_color, background) -> torch.Tensor:
    core_threshold = CORE_FRACTION * (object_color - background).norm(dim=1)
    core_mask = object_mask(frames, background, core_threshold)
    object_error = (_weighted_mean_color(frames, core_mask) - object_color).pow(2).sum(dim=1)
    background_error = (_weighted_mean_color(frames, 1 - mask) - background).pow(2).sum(dim=1)
    sigma2 = COLOR_SIGMA**2
    return 0.5 * torch.exp(-object_error / sigma2) + 0.5 * torch.exp(-background_error / sigma2)


def direction_score(mask: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    height, width = mask.shape[-2:]
    ys = (torch.arange(height, device=mask.device, dtype=mask.dtype) + 0.5) / height
    xs = (torch.arange(width, device=mask.device, dtype=mask.dtype) + 0.5) / width
    area = mask.sum(dim=(2, 3)) + EPS  # [B, T]
    centroid_x = (mask * xs.view(1, 1, 1, -1)).sum(dim=(2, 3)) / area
    centroid_y = (mask * ys.view(1, 1, -1, 1)).sum(dim=(2, 3)) / area
    velocity = torch.stack([centroid_x.diff(dim=1), centroid_y.diff(dim=1)], dim=-1)  # [B, T-1, 2]
    along = (velocity * direction.unsqueeze(1)).sum(dim=-1)
    return torch.sigmoid(DIRECTION_GAIN * along).mean(dim=1)


def flicker_score(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    background = 1 - mask
    both = background[:, 1:] * background[:, :-1]  # [B, T-1, H, W]
    change = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=2)
    return 1 - (both * change).sum(dim=(1, 2, 3)) / (both.sum(dim=(1, 2, 3)) + EPS)
