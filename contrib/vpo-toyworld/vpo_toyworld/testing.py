"""Helpers for tests: a ground-truth clip and corrupted versions of it."""

from __future__ import annotations

import torch

from . import world


def corrupted_variants(attributes: world.Attributes, seed: int) -> dict[str, torch.Tensor]:
    """Ground truth and corrupted versions of one clip, all to be scored against the ground-truth prompt."""
    clip = world.render(attributes, seed)
    other_color = next(c for c in world.SHAPE_COLORS if c != attributes.color)
    other_background = next(b for b in world.BACKGROUND_COLORS if b != attributes.background)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[attributes.direction]
    change = lambda **kw: world.render(world.Attributes(**{**attributes.__dict__, **kw}), seed)  # noqa: E731
    generator = torch.Generator().manual_seed(seed)
    return {
        "truth": clip,
        "shuffled": clip[torch.tensor([4, 0, 8, 2, 6, 1, 7, 3, 5])],
        "wrong_color": change(color=other_color),
        "wrong_background": change(background=other_background),
        "wrong_direction": change(direction=opposite),
        "flickering": (clip + 0.1 * torch.randn(9, 1, 1, 1, generator=generator)).clamp(0, 1),  # brightness
    }
