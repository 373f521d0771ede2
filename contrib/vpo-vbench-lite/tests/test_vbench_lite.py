"""Tests of vpo-vbench-lite. Reward authors: copy this file and keep the same kinds of checks.

Every expected value below is worked out by hand from the formula in the metric's docstring.
"""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch
from pydantic import ValidationError
from vpo_core import BuildContext, PartConfig, Reward, VpoError

from vpo_vbench_lite import (
    DIMENSION_NAMES,
    VBenchLiteConfig,
    dynamic_degree,
    imaging_sharpness,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)
from vpo_vbench_lite.plugin import build_vbench_lite
from vpo_vbench_lite.reward import DIMENSIONS

CPU = BuildContext(device=torch.device("cpu"), seed=0)


def constant_video(values: list[float], size: int = 8) -> torch.Tensor:
    """One video [1, T, 3, size, size] whose frame t is uniformly values[t]."""
    return torch.tensor(values).view(1, -1, 1, 1, 1).expand(1, len(values), 3, size, size).clone()


def checkerboard(size: int = 8) -> torch.Tensor:
    """[size, size] of 0/1 with 1-pixel cells."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((rows + cols) % 2).float()


def gray_video(image: torch.Tensor, frames: int = 1) -> torch.Tensor:
    """[1, frames, 3, H, W] repeating a gray image (equal RGB, so luma == the image)."""
    return image.expand(1, frames, 3, *image.shape).clone()


def random_videos(batch: int = 5, frames: int = 4, size: int = 12) -> torch.Tensor:
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- formulas
def test_static_video_is_flicker_free_consistent_and_still():
    video = gray_video(torch.rand(8, 8, generator=torch.Generator().manual_seed(1)), frames=4)
    assert temporal_flickering(video).item() == pytest.approx(1.0)
    assert motion_smoothness(video).item() == pytest.approx(1.0)
    assert dynamic_degree(video).item() == pytest.approx(0.0)
    assert subject_consistency(video).item() == pytest.approx(1.0)


def test_alternating_black_white_is_all_flicker():
    video = constant_video([0.0, 1.0, 0.0, 1.0])
    assert temporal_flickering(video).item() == pytest.approx(0.0)
    # each middle frame is 1 (or 0) while its neighbours average 0 (or 1): error 1.
    assert motion_smoothness(video).item() == pytest.approx(0.0)
    # mean change 1 per frame: 1 / (1 + 0.02).
    assert dynamic_degree(video).item() == pytest.approx(1 / 1.02)


def test_fade_of_a_tenth_per_frame():
    video = constant_video([0.1, 0.2, 0.3, 0.4])
    assert temporal_flickering(video).item() == pytest.approx(0.9)
    assert motion_smoothness(video).item() == pytest.approx(1.0)  # linear in time
    assert dynamic_degree(video, scale=0.02).item() == pytest.approx(0.1 / 0.12)
    assert dynamic_degree(video, scale=0.1).item() == pytest.approx(0.5)


def test_linear_ramp_moving_at_constant_speed_is_perfectly_smooth():
    # I(x, t) = 0.2 + 0.05 * (x - t): a ramp sliding right by one pixel per frame, linear in t at every pixel.
    x = torch.arange(8.0).view(1, 8)
    frames = [(0.2 + 0.05 * (x - t)).expand(8, 8) for t in range(5)]
    video = torch.stack(frames).view(1, 5, 1, 8, 8).expand(1, 5, 3, 8, 8)
    assert motion_smoothness(video).item() == pytest.approx(1.0)
    assert temporal_flickering(video).item() == pytest.approx(0.95)  # every pixel changes by 0.05
    # A jump in the middle breaks smoothness: frames 0,1,2 at 0.5 then 0.9 -> errors 0, 0.2 -> mean 0.1.
    assert motion_smoothness(constant_video([0.5, 0.5, 0.5, 0.9])).item() == pytest.approx(0.9)


def test_sharp_checkerboard_beats_its_blurred_version():
    sharp = checkerboard()
    # A 3x3 box blur (periodic borders) of a 1-pixel checkerboard: 1-cells become 5/9, 0-cells 4/9.
    blurred = 4 / 9 + sharp / 9
    # Laplacian of the checkerboard is +-4 (variance 16); of the blurred one +-4/9 (variance 16/81).
    assert imaging_sharpness(gray_video(sharp)).item() == pytest.approx(16 / (16 + 0.01))
    assert imaging_sharpness(gray_video(blurred)).item() == pytest.approx((16 / 81) / (16 / 81 + 0.01))
    assert imaging_sharpness(gray_video(torch.full((8, 8), 0.3))).item() == pytest.approx(0.0)


def test_subject_consistency_of_a_negated_frame_is_zero():
    image = checkerboard()
    video = torch.cat([gray_video(image), gray_video(1 - image)], dim=1)
    # centred frames are exact negatives: cosine -1 to first and to previous -> (1 - 1) / 2.
    assert subject_consistency(video).item() == pytest.approx(0.0)
    # a brightness shift leaves the centred frame unchanged.
    shifted = torch.cat([gray_video(image * 0.5), gray_video(image * 0.5 + 0.3)], dim=1)
    assert subject_consistency(shifted).item() == pytest.approx(1.0)
    # flat frames: two flat count as similar, flat against textured as cosine 0 -> 0.5.
    assert subject_consistency(constant_video([0.2, 0.7])).item() == pytest.approx(1.0)
    flat_then_texture = torch.cat([gray_video(torch.full((8, 8), 0.5)), gray_video(image)], dim=1)
    assert subject_consistency(flat_then_texture).item() == pytest.approx(0.5)


def test_scores_stay_in_range_on_random_videos():
    videos = random_videos()
    for name in DIMENSIONS:
        scores = build_vbench_lite(VBenchLiteConfig(dimensions=[name]), CPU).score(videos, [""] * 5)[name]
        assert scores.shape == (5,)
        assert ((scores >= 0) & (scores <= 1)).all(), name


# ----------------------------------------------------------------------------------------- the reward
def test_reward_follows_the_protocol_and_defaults_to_all_dimensions():
    reward = build_vbench_lite(VBenchLiteConfig(), CPU)
    assert isinstance(reward, Reward)
    assert tuple(DIMENSIONS) == DIMENSION_NAMES  # the metric table covers exactly the names the config accepts
    assert VBenchLiteConfig().score_dimensions() == list(DIMENSION_NAMES)
    assert VBenchLiteConfig.differentiable is True
    scores = reward.score(random_videos(batch=2), ["a", "b"])
    assert set(scores) == set(DIMENSION_NAMES)


def test_micro_batching_matches_one_batch():
    videos = random_videos(batch=5)
    whole = build_vbench_lite(VBenchLiteConfig(micro_batch_size=8), CPU).score(videos, [""] * 5)
    chunked = build_vbench_lite(VBenchLiteConfig(micro_batch_size=2), CPU).score(videos, [""] * 5)
    for name in DIMENSIONS:
        torch.testing.assert_close(chunked[name], whole[name])


def test_gradient_reaches_the_frames_for_every_dimension():
    for name in DIMENSIONS:
        videos = random_videos(batch=2).requires_grad_(True)
        reward = build_vbench_lite(VBenchLiteConfig(dimensions=[name], micro_batch_size=1), CPU)
        reward.score(videos, ["", ""])[name].sum().backward()
        assert torch.isfinite(videos.grad).all(), name
        assert videos.grad.abs().sum() > 0, name


def test_gradient_is_finite_on_flat_frames():
    video = constant_video([0.5, 0.5, 0.5]).requires_grad_(True)
    scores = build_vbench_lite(VBenchLiteConfig(), CPU).score(video, [""])
    sum(scores.values()).sum().backward()
    assert torch.isfinite(video.grad).all()


def test_half_precision_frames_are_scored_in_float32():
    videos = random_videos(batch=2).to(torch.bfloat16)
    scores = build_vbench_lite(VBenchLiteConfig(dimensions=["temporal_flickering"]), CPU).score(videos, ["", ""])
    assert scores["temporal_flickering"].dtype == torch.float32


def test_single_frame_videos():
    image = gray_video(checkerboard())
    only_sharpness = build_vbench_lite(VBenchLiteConfig(dimensions=["imaging_sharpness"]), CPU)
    assert only_sharpness.score(image, [""])["imaging_sharpness"].item() == pytest.approx(16 / 16.01)
    with pytest.raises(VpoError, match="too few for temporal_flickering.*imaging_sharpness"):
        build_vbench_lite(VBenchLiteConfig(dimensions=["temporal_flickering"]), CPU).score(image, [""])
    two_frames = gray_video(checkerboard(), frames=2)
    with pytest.raises(VpoError, match="too few for motion_smoothness"):
        build_vbench_lite(VBenchLiteConfig(), CPU).score(two_frames, [""])


def test_wrong_frame_layout_is_a_clear_error():
    reward = build_vbench_lite(VBenchLiteConfig(), CPU)
    with pytest.raises(VpoError, match=r"\[B, T, 3, H, W\]"):
        reward.score(torch.rand(1, 3, 8, 8), [""])  # a missing time axis


# ----------------------------------------------------------------------------------------- config
def test_config_rejects_unknown_dimensions_listing_the_valid_ones():
    with pytest.raises(ValidationError) as info:
        VBenchLiteConfig(dimensions=["temporal_flickering", "temporal_flicker"])
    message = str(info.value)
    assert "'temporal_flicker'" in message and "did you mean 'temporal_flickering'" in message
    assert all(name in message for name in DIMENSIONS)


@pytest.mark.parametrize("bad", [
    {"dimensions": []},
    {"dimensions": ["dynamic_degree", "dynamic_degree"]},
    {"micro_batch_size": 0},
    {"dynamic_scale": 0.0},
    {"sharpness_scale": -1.0},
    {"model": "org/hub-id"},  # PartConfig forbids keys the reward does not know
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        VBenchLiteConfig(**bad)


def test_config_accepts_one_name_and_all():
    assert VBenchLiteConfig(dimensions="dynamic_degree").selected() == ("dynamic_degree",)
    assert VBenchLiteConfig(dimensions="all").selected() == tuple(DIMENSIONS)
    assert issubclass(VBenchLiteConfig, PartConfig)


def test_device_option_overrides_the_run_device():
    reward = build_vbench_lite(VBenchLiteConfig(device="cpu"), BuildContext(device=torch.device("meta"), seed=0))
    assert reward.device == torch.device("cpu")
    assert build_vbench_lite(VBenchLiteConfig(), CPU).device == torch.device("cpu")


# ----------------------------------------------------------------------------------------- packaging
def test_entry_point_registers_the_reward():
    entry_points = [ep for ep in md.entry_points(group="vpo") if ep.name == "vbench-lite"]
    assert entry_points, "no `vpo` entry point 'vbench-lite': run `pip install -e contrib/vpo-vbench-lite`"
    assert entry_points[0].value == "vpo_vbench_lite.plugin"
    assert entry_points[0].dist.metadata["Name"] == "vpo-vbench-lite"

    recorded = []
    plugin = entry_points[0].load()
    plugin.vpo_register_rewards(register=lambda *args: recorded.append(args))
    assert [name for name, *_ in recorded] == ["vbench_lite"]
    _, factory, config_model = recorded[0]
    reward = factory(config_model(dimensions=["temporal_flickering"]), CPU)
    assert reward.score(constant_video([0.0, 0.25]), [""])["temporal_flickering"].item() == pytest.approx(0.75)
