"""The toy world: coloured shapes moving across plain backgrounds, rendered procedurally with torch.

A clip is fully determined by its attributes (shape colour, shape, direction, background colour) and a seed
(the seed picks the shape's size, start position and speed). Clips are ``[T, C, H, W] = [9, 3, 32, 32]``
floats in ``[0, 1]``; 9 frames because CogVideoX needs ``num_frames = 4k + 1``.

Prompts are one fixed template, so text and attributes convert both ways::

    "a red circle moving left on a dark blue background"  <->  Attributes("red", "circle", "left", "dark blue")
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
from vpo_core import VpoError

NUM_FRAMES = 9
SIZE = 32

# Palettes chosen so every shape colour stands out from every background (RGB distance >= 0.5).
SHAPE_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.25),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "dark blue": (0.08, 0.12, 0.45),
    "gray": (0.45, 0.45, 0.45),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion vectors in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

PROMPT_TEMPLATE = "a {color} {shape} moving {direction} on a {background} background"
_PROMPT_PATTERN = re.compile(
    r"^\s*an? (?P<color>{c}) (?P<shape>{s}) moving (?P<direction>{d}) on an? (?P<background>{b}) background\s*\.?\s*$".format(
        c="|".join(SHAPE_COLORS), s="|".join(SHAPES), d="|".join(DIRECTIONS), b="|".join(BACKGROUND_COLORS)
    ),
    re.IGNORECASE,
)


class PromptError(VpoError):
    """A prompt that is not a toy-world prompt."""


@dataclass(frozen=True)
class Attributes:
    color: str
    shape: str
    direction: str
    background: str

    def __post_init__(self):
        for value, allowed, what in (
            (self.color, SHAPE_COLORS, "color"),
            (self.shape, SHAPES, "shape"),
            (self.direction, DIRECTIONS, "direction"),
            (self.background, BACKGROUND_COLORS, "background"),
        ):
            if value not in allowed:
                raise PromptError(f"unknown toy-world {what} {value!r}; choose one of {list(allowed)}")

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(**self.__dict__)


def parse_prompt(prompt: str) -> Attributes:
    """Prompt text -> attributes; raises ``PromptError`` naming the expected template."""
    match = _PROMPT_PATTERN.match(prompt)
    if match is None:
        raise PromptError(
            f"cannot parse toy-world prompt {prompt!r}: expected '{PROMPT_TEMPLATE}' with color in "
            f"{list(SHAPE_COLORS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}, background in "
            f"{list(BACKGROUND_COLORS)}"
        )
    return Attributes(**{key: value.lower() for key, value in match.groupdict().items()})


def all_attributes() -> list[Attributes]:
    combos = itertools.product(SHAPE_COLORS, SHAPES, DIRECTIONS, BACKGROUND_COLORS)
    return [Attributes(*combo) for combo in combos]


def _is_heldout(attributes: Attributes) -> bool:
    # About a sixth of the combinations (32 of 180), spread so every single attribute value still occurs in
    # training: held-out prompts test composition, not unseen words.
    index_sum = (
        list(SHAPE_COLORS).index(attributes.color)
        + SHAPES.index(attributes.shape)
        + list(DIRECTIONS).index(attributes.direction)
        + list(BACKGROUND_COLORS).index(attributes.background)
    )
    return index_sum % 6 == 0


def train_attributes() -> list[Attributes]:
    return [a for a in all_attributes() if not _is_heldout(a)]


def heldout_attributes() -> list[Attributes]:
    return [a for a in all_attributes() if _is_heldout(a)]


def train_prompts() -> list[str]:
    return [a.prompt for a in train_attributes()]


def heldout_prompts() -> list[str]:
    return [a.prompt for a in heldout_attributes()]


def vocabulary() -> list[str]:
    """Every word a toy-world prompt can contain (for the word-level tokenizer)."""
    words = {"an"}
    for attributes in all_attributes():
        words.update(attributes.prompt.split())
    return sorted(words)


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of pixel offsets ``dx, dy`` from a shape of half-size ``radius``."""
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius  # same area as the circle, roughly
    # Triangle, apex up: apex (0, -r), base corners (+-r, 0.8 r); max over the three edge half-planes.
    slope_norm = (1.8**2 + 1.0) ** 0.5
    right = (1.8 * dx - dy - radius) / slope_norm
    left = (-1.8 * dx - dy - radius) / slope_norm
    bottom = dy - 0.8 * radius
    return torch.maximum(torch.maximum(right, left), bottom)


def render(attributes: Attributes | str, seed: int) -> torch.Tensor:
    """One clip ``[9, 3, 32, 32]`` in [0, 1]; the same (attributes, seed) always gives the same clip."""
    if isinstance(attributes, str):
        attributes = parse_prompt(attributes)
    generator = torch.Generator().manual_seed(int(seed))
    uniform = lambda low, high: low + (high - low) * torch.rand((), generator=generator).item()  # noqa: E731

    radius = uniform(5.0, 7.0)
    speed = uniform(1.5, 2.0)  # pixels per frame
    travel = speed * (NUM_FRAMES - 1)
    ux, uy = DIRECTIONS[attributes.direction]
    margin = radius + 1.0
    # Start so that the whole path stays inside the frame.
    along_start = uniform(margin, SIZE - margin - travel)
    across = uniform(margin, SIZE - margin)
    if ux != 0:
        x0 = along_start if ux > 0 else SIZE - along_start
        y0 = across
    else:
        x0 = across
        y0 = along_start if uy > 0 else SIZE - along_start

    centers = torch.arange(SIZE, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centers, centers, indexing="ij")
    shape_color = torch.tensor(SHAPE_COLORS[attributes.color]).view(3, 1, 1)
    background = torch.tensor(BACKGROUND_COLORS[attributes.background]).view(3, 1, 1)
    frames = []
    for t in range(NUM_FRAMES):
        cx, cy = x0 + ux * speed * t, y0 + uy * speed * t
        distance = _signed_distance(attributes.shape, xs - cx, ys - cy, radius)
        coverage = (0.5 - distance).clamp(0.0, 1.0)  # one-pixel anti-aliased edge
        frames.append(background * (1 - coverage) + shape_color * coverage)
    return torch.stack(frames)


def render_batch(attributes: list[Attributes | str], seeds: list[int]) -> torch.Tensor:
    """Clips ``[B, 9, 3, 32, 32]`` for paired attributes and seeds."""
    return torch.stack([render(a, s) for a, s in zip(attributes, seeds, strict=True)])
