"""Weight-free, VBench-style video metrics in pure torch.

Every function takes frames ``[B, T, 3, H, W]`` in ``[0, 1]`` and returns a score ``[B]`` in ``[0, 1]``,
higher is better (for ``dynamic_degree``: higher = more motion). All are differentiable with respect to
the frames. They are *proxies*: VBench scores some of these dimensions with learned models (AMT, RAFT,
MUSIQ, DINO); here each is replaced by a pixel statistic that needs no weights. The numbers are
therefore not comparable with published VBench numbers, only between videos scored the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights (what OpenCV's RGB->gray uses, and so what VBench's frame reading sees).
_LUMA = (0.299, 0.587, 0.114)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3, H, W]`` -> ``[B, T, H, W]`` luma in ``[0, 1]``."""
    weights = frames.new_tensor(_LUMA).view(1, 1, 3, 1, 1)
    return (frames * weights).sum(dim=2)


def squash(value: torch.Tensor, scale: float) -> torch.Tensor:
    """Maps ``[0, inf)`` onto ``[0, 1)`` as ``value / (value + scale)``: ``scale`` itself maps to 0.5."""
    return value / (value + scale)


def _pool(images: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Average-pools the last two dims to at most ``grid_size`` x ``grid_size`` (blurs away pixel noise)."""
    lead, (height, width) = images.shape[:-2], images.shape[-2:]
    size = (min(grid_size, height), min(grid_size, width))
    pooled = F.adaptive_avg_pool2d(images.reshape(-1, 1, height, width), size)
    return pooled.reshape(*lead, *size)


def temporal_flickering(frames: torch.Tensor) -> torch.Tensor:
    """``1 - mean_t mean_pixels |f_t - f_{t-1}|`` over all channels. Range ``[0, 1]``; needs T >= 2.

    VBench computes the same mean absolute error on 0..255 frames of static-scene videos and reports
    ``(255 - MAE) / 255``; on ``[0, 1]`` frames that is ``1 - MAE``. A still video scores 1, a video
    alternating black and white scores 0. It rewards stillness as much as the absence of flicker, which is
    why VBench applies it to static-scene prompts only: pair it with ``dynamic_degree`` when training.
    """
    mae = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    return 1.0 - mae


def motion_smoothness(frames: torch.Tensor) -> torch.Tensor:
    """``1 - mean_t mean_pixels |f_t - (f_{t-1} + f_{t+1}) / 2|`` for ``t = 1 .. T-2``. Range ``[0, 1]``; T >= 3.

    Proxy: VBench reconstructs the odd frames from the even ones with a frame-interpolation network (AMT)
    and scores ``(255 - MAE) / 255`` of the reconstruction. Here every middle frame is "interpolated" as
    the average of its two neighbours, i.e. linear interpolation in pixel space. Any motion whose pixel
    values change linearly in time (a fade, a linear intensity ramp translating at constant speed) scores
    1; jerky or alternating frames score low. Unlike AMT it also penalises smooth but non-linear pixel
    changes (e.g. a sharp edge moving), so treat it as a smoothness *proxy*.
    """
    midpoint = (frames[:, :-2] + frames[:, 2:]) / 2
    error = (frames[:, 1:-1] - midpoint).abs().mean(dim=(1, 2, 3, 4))
    return 1.0 - error


def dynamic_degree(frames: torch.Tensor, grid_size: int = 32, scale: float = 0.02) -> torch.Tensor:
    """``m / (m + scale)`` with ``m = mean_t mean_pixels |g_t - g_{t-1}|``, ``g`` = luma average-pooled to
    ``grid_size`` x ``grid_size``. Range ``[0, 1 / (1 + scale)]``; T >= 2. Higher = more motion.

    Proxy: VBench estimates optical flow with RAFT and calls a video dynamic when enough frame pairs have
    a large flow (a 0/1 value per video). Here motion is the mean change of a blurred, low-resolution luma
    image, which ignores pixel noise but also counts brightness changes as motion. ``scale`` is the mean
    change that scores 0.5 (0.02 = about 5 grey levels of 255 per frame on average).
    """
    pooled = _pool(luminance(frames), grid_size)
    change = (pooled[:, 1:] - pooled[:, :-1]).abs().mean(dim=(1, 2, 3))
    return squash(change, scale)


def imaging_sharpness(frames: torch.Tensor, scale: float = 0.01) -> torch.Tensor:
    """``v / (v + scale)`` with ``v`` = per-frame variance of the Laplacian of luma, averaged over frames.
    Range ``[0, 16 / (16 + scale)]`` (a 1-pixel black/white checkerboard has the largest variance, 16);
    needs H, W >= 3. Works for T = 1.

    Proxy for VBench's imaging quality (MUSIQ, a learned no-reference quality model): the variance of the
    Laplacian is the classic focus measure; blur and low detail lower it. The Laplacian is taken without
    padding so borders do not add fake edges. ``scale`` is the variance that scores 0.5; 0.01 on ``[0, 1]``
    luma equals 650 on the 0..255 scale OpenCV users know. The value depends on resolution (downscaling
    sharpens), so compare videos of the same size. Noise also raises it: do not optimise it alone.
    """
    batch, time, height, width = frames.shape[0], frames.shape[1], frames.shape[-2], frames.shape[-1]
    luma = luminance(frames).reshape(batch * time, 1, height, width)
    kernel = frames.new_tensor(_LAPLACIAN).view(1, 1, 3, 3)
    laplacian = F.conv2d(luma, kernel)
    variance = laplacian.flatten(1).var(dim=1, correction=0).view(batch, time).mean(dim=1)
    return squash(variance, scale)


def _centred_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity over the last dim after removing each vector's mean; two flat vectors count as 1."""
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    norm_a, norm_b = a.norm(dim=-1), b.norm(dim=-1)
    cosine = (a * b).sum(dim=-1) / (norm_a * norm_b).clamp_min(eps * eps)
    both_flat = (norm_a < eps) & (norm_b < eps)
    return torch.where(both_flat, torch.ones_like(cosine), cosine)


def subject_consistency(frames: torch.Tensor, grid_size: int = 16) -> torch.Tensor:
    """``(1 + c) / 2`` with ``c = mean_{t>=1} (cos(x_t, x_0) + cos(x_t, x_{t-1})) / 2``. Range ``[0, 1]``;
    T >= 2.

    ``x_t`` is frame ``t`` (RGB) average-pooled to ``grid_size`` x ``grid_size``, flattened and centred
    (its mean removed, so the cosine is a correlation in ``[-1, 1]`` and a uniform brightness shift does
    not count). Two flat (single-colour) frames count as similar (1); a flat frame against a textured one
    counts as 0. Proxy: VBench compares DINO features of each frame with the first and the previous frame
    in the same way (clamping negatives to 0 instead of rescaling). A still video scores 1, a video whose
    frame is replaced by its negative scores 0.
    """
    pooled = _pool(frames, grid_size).flatten(2)  # [B, T, 3 * grid * grid]
    to_first = _centred_cosine(pooled[:, 1:], pooled[:, :1].expand_as(pooled[:, 1:]))
    to_previous = _centred_cosine(pooled[:, 1:], pooled[:, :-1])
    cosine = ((to_first + to_previous) / 2).mean(dim=1)
    return (1.0 + cosine) / 2
