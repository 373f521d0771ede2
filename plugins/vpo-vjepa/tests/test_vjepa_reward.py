"""V-JEPA 2 reward on a tiny random VJEPA2Model written with save_pretrained and read by the plugin's loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, VJEPA2Config, VJEPA2Model

from vpo_core import BuildContext, VpoError
from vpo_vjepa.reward import VJEPAConfig, build_vjepa_reward, make_mask

PATCH, CROP, TUBELET = 4, 16, 2
GRID = CROP // PATCH
CONTEXT = BuildContext(device=torch.device("cpu"), seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = VJEPA2Config(
        patch_size=PATCH, crop_size=CROP, frames_per_clip=8, tubelet_size=TUBELET, hidden_size=32,
        num_attention_heads=2, num_hidden_layers=2, mlp_ratio=2.0, pred_hidden_size=24, pred_num_attention_heads=2,
        pred_num_hidden_layers=2, pred_num_mask_tokens=2, pred_mlp_ratio=2.0, pred_zero_init_mask_tokens=False,
    )
    path = tmp_path_factory.mktemp("vjepa2-tiny")
    VJEPA2Model(config).save_pretrained(path)
    return path


def make_reward(model_dir, **overrides):
    return build_vjepa_reward(VJEPAConfig(model=str(model_dir), **({"num_frames": 8} | overrides)), CONTEXT)


def random_video(batch=2, frames=8, height=CROP, width=CROP, seed=1):
    return torch.rand(batch, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


def last_block_mask(steps_in_target: int, steps: int = 4):
    """Targets = the last time steps (every spatial position); context = the earlier ones."""
    per_step = GRID * GRID
    split = (steps - steps_in_target) * per_step
    return torch.arange(split), torch.arange(split, steps * per_step)


def test_score_shape_and_determinism(model_dir):
    reward = make_reward(model_dir)
    video = random_video(batch=3, frames=10, height=20, width=28)  # resized, cropped, frames resampled
    first = reward.score(video, ["a", "b", "c"])
    assert set(first) == {"temporal_consistency"} and first["temporal_consistency"].shape == (3,)
    assert torch.isfinite(first["temporal_consistency"]).all() and (first["temporal_consistency"] < 0).all()
    torch.testing.assert_close(reward.score(video, ["a", "b", "c"]), first, rtol=0, atol=0)
    rebuilt = make_reward(model_dir)  # same seed -> same masks -> same score
    torch.testing.assert_close(rebuilt.score(video, ["a", "b", "c"]), first, rtol=0, atol=0)
    other_seed = make_reward(model_dir, mask="random", seed=123).score(video, ["a", "b", "c"])
    assert not torch.allclose(other_seed["temporal_consistency"], first["temporal_consistency"])


def test_score_is_minus_l1_of_stock_forward_with_context_only_video(model_dir):
    """With the target block at the end, encoding the context tokens alone equals running the stock encoder
    on the shortened video; the score must be -L1(predictor, layer-normed full-clip features) built from the
    model's stock forwards."""
    reward = make_reward(model_dir)
    context, target = last_block_mask(steps_in_target=2)
    reward.masks = lambda: [(context, target)]
    video = random_video()
    score = reward.score(video, ["", ""])["temporal_consistency"]

    model = VJEPA2Model.from_pretrained(model_dir).eval()
    pixels = reward.preprocess(video)
    with torch.no_grad():
        full = model.encoder(pixel_values_videos=pixels).last_hidden_state
        short = model.encoder(pixel_values_videos=pixels[:, : 2 * TUBELET]).last_hidden_state
        positions = lambda idx: idx.expand(len(video), -1)  # noqa: E731
        predicted = model.predictor(short, context_mask=[positions(context)], target_mask=[positions(target)])
    wanted = F.layer_norm(full, (full.shape[-1],))[:, target]
    expected = -(predicted.last_hidden_state - wanted).abs().mean(dim=(1, 2))
    torch.testing.assert_close(score, expected, atol=1e-5, rtol=1e-5)


def test_context_encoding_ignores_target_pixels_and_gradient_flows_through_context_only(model_dir):
    reward = make_reward(model_dir)
    context, target = last_block_mask(steps_in_target=1)
    reward.masks = lambda: [(context, target)]
    video = random_video().requires_grad_(True)
    reward.score(video, ["", ""])["temporal_consistency"].sum().backward()
    grad_per_frame = video.grad.abs().flatten(2).sum(-1)  # [B, T]
    # Frames 6-7 form the last tubelet step (the target): no gradient; all context frames get one.
    assert (grad_per_frame[:, :6] > 0).all() and (grad_per_frame[:, 6:] == 0).all()

    changed = video.detach().clone()
    changed[:, 6:] = torch.rand_like(changed[:, 6:])
    pixels, pixels_changed = reward.preprocess(video.detach()), reward.preprocess(changed)
    torch.testing.assert_close(
        reward.encode_context(pixels_changed, context), reward.encode_context(pixels, context), rtol=0, atol=0
    )
    # The full-clip encoder (what VJEPA2Model.forward feeds the predictor) does see them.
    full = reward.model.encoder(pixel_values_videos=pixels).last_hidden_state[:, context]
    full_changed = reward.model.encoder(pixel_values_videos=pixels_changed).last_hidden_state[:, context]
    assert not torch.allclose(full, full_changed)


def test_micro_batch_size_does_not_change_scores(model_dir):
    video = random_video(batch=3, seed=4)
    one = make_reward(model_dir, micro_batch_size=1, num_masks=2).score(video, [""] * 3)
    many = make_reward(model_dir, micro_batch_size=8, num_masks=2).score(video, [""] * 3)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["temporal_block", "tubes", "random"])
def test_masks_partition_the_token_grid(kind):
    steps = 4
    context, target = make_mask(kind, (steps, GRID, GRID), 0.5, torch.Generator().manual_seed(0))
    total = steps * GRID * GRID
    assert sorted(torch.cat([context, target]).tolist()) == list(range(total))
    assert len(target) == total // 2
    target_grid = torch.zeros(total, dtype=torch.bool)
    target_grid[target] = True
    target_grid = target_grid.view(steps, GRID * GRID)
    if kind == "temporal_block":  # whole time steps, contiguous
        masked_steps = target_grid.all(dim=1).nonzero().squeeze(1)
        assert (target_grid.any(dim=1) == target_grid.all(dim=1)).all()
        assert masked_steps.tolist() == list(range(int(masked_steps[0]), int(masked_steps[0]) + 2))
    if kind == "tubes":  # the same spatial positions at every time step
        assert (target_grid == target_grid[0]).all()


def test_errors_for_missing_foreign_or_predictorless_checkpoints(model_dir, tmp_path):
    with pytest.raises(VpoError, match="not found"):
        make_reward(tmp_path / "absent")
    bert_dir = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(bert_dir)
    with pytest.raises(VpoError, match="not V-JEPA 2"):
        make_reward(bert_dir)
    no_predictor = tmp_path / "no-predictor"
    VJEPA2Model.from_pretrained(model_dir).save_pretrained(no_predictor)
    weights = load_file(no_predictor / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("predictor.")}, no_predictor / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(VpoError, match="predictor"):
        make_reward(no_predictor)
    with pytest.raises(VpoError, match="multiple of the tubelet size"):
        make_reward(model_dir, num_frames=7)


def test_plugin_registers_reward():
    from vpo_vjepa import plugin

    registered = {}
    plugin.vpo_register_rewards(register=lambda name, factory, config: registered.update({name: config}))
    assert registered == {"vjepa": VJEPAConfig}


def test_other_input_size_changes_the_token_grid(model_dir):
    reward = make_reward(model_dir, image_size=8, num_frames=4)
    assert reward.grid == (2, 2, 2)
    score = reward.score(random_video(frames=6, height=12, width=12), ["", ""])["temporal_consistency"]
    assert score.shape == (2,) and torch.isfinite(score).all()
