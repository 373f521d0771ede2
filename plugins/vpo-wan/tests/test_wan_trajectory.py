"""Trajectories (GRPO) of the wan policy: Flow-GRPO's SDE form of the flow-matching Euler step, recorded log-densities,
re-evaluated transitions, windows, and agreement with ``sample``."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from vpo_core import BuildContext, TrajectorySettings
from vpo_wan import WanConfig, build, build_tiny_wan

ROWS = [("a cat running", 5), ("a red car in the city", 6), ("a bird flying", 7)]
PROMPTS, SEEDS = [prompt for prompt, _ in ROWS], [seed for _, seed in ROWS]
SAMPLING = dict(num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def make_policy(tmp_path_factory):
    """Tiny Wan policies sampling with the flow-matching Euler scheduler; unless ``base``, their LoRA has an effect
    (B != 0) so that gradients reach LoRA A as well. ``make_policy.models`` holds the pipelines on disk."""
    models = {}

    def make(variant="2.1", base=False, **overrides):
        if variant not in models:
            models[variant] = build_tiny_wan(tmp_path_factory.mktemp("wan") / variant, variant=variant)
        config = WanConfig(model=str(models[variant]), scheduler="euler", **{**SAMPLING, **overrides})
        policy = build(config, BuildContext(device=torch.device("cpu"), seed=0))
        torch.manual_seed(0)
        with torch.no_grad():
            for parameter in [] if base else policy.trainable_parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
        return policy

    make.models = models
    return make


def test_sampler_euler_rows_match_the_stock_pipeline_with_that_scheduler(make_policy):
    base = make_policy(base=True)
    pipe = WanPipeline.from_pretrained(make_policy.models["2.1"])
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # the checkpoint's flow_shift
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(SEEDS[0]), output_type="pt", **SAMPLING).frames
    difference = (base.sample(PROMPTS[:1], SEEDS[:1]).frames - expected).abs().max().item()
    print(f"scheduler euler: max |policy - stock WanPipeline| = {difference:.2e}")
    assert difference < 2e-5


def flow_grpo_log_prob(x, velocity, x_next, sigma, sigma_next, noise_level, sigma_max):
    """Flow-GRPO's step written out (not through vpo_core.sampling)."""
    dt = sigma_next - sigma
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(1)


def test_recorded_log_probs_are_flow_grpo_gaussians_of_the_recorded_states(make_policy):
    policy = make_policy()
    trajectory = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(noise_level=0.7), decode=False)
    assert trajectory.latents.shape == (2, 5, 3, 4, 4, 4) and trajectory.steps == [0, 1, 2, 3]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas.tolist()
    sigma_max = next(s for s in sigmas if s < 1)
    embeds = policy.embed_prompts(PROMPTS[:2])
    negative = policy.embed_prompts([""]).expand_as(embeds)
    for i, t in enumerate(scheduler.timesteps):
        x = trajectory.latents[:, i]
        hidden = x.permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            cond, uncond = (policy.transformer(hidden_states=hidden, timestep=t.expand(2), encoder_hidden_states=e)
                            .sample.permute(0, 2, 1, 3, 4) for e in (embeds, negative))
        velocity = uncond + 5.0 * (cond - uncond)
        expected = flow_grpo_log_prob(x, velocity, trajectory.latents[:, i + 1], sigmas[i], sigmas[i + 1], 0.7,
                                      sigma_max)
        torch.testing.assert_close(trajectory.log_probs[:, i], expected, atol=2e-4, rtol=1e-5)


def test_transitions_recompute_the_recorded_log_probs_with_a_graph_to_lora_only(make_policy):
    policy = make_policy("2.2-a14b")  # steps 0-2: transformer, step 3: transformer_2
    trajectory = policy.sample_trajectory(PROMPTS, SEEDS, TrajectorySettings(noise_level=1.0), decode=False)
    rows, steps = [0, 1, 2, 0, 2], [3, 0, 1, 2, 3]
    transition = policy.transition(trajectory, rows, steps)
    recorded = trajectory.log_probs[rows, steps]
    print(f"max |transition - recorded| log-prob: {(transition.log_prob - recorded).abs().max().item():.2e}")
    torch.testing.assert_close(transition.log_prob.detach(), recorded, atol=1e-5, rtol=1e-6)
    assert transition.mean.shape == (5, 3, 4, 4, 4) and transition.std.shape == (5,)
    transition.log_prob.sum().backward()
    lora = {id(p) for p in policy.trainable_parameters()}
    for module in (policy.pipe.transformer, policy.pipe.transformer_2):
        for name, parameter in module.named_parameters():
            assert (parameter.grad is not None) == (id(parameter) in lora), name
    assert all(p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    with torch.no_grad(), policy.use_reference():  # the base model gives other densities
        assert (policy.transition(trajectory, rows, steps).log_prob - recorded).abs().max() > 1e-3


def test_a_row_alone_equals_the_row_in_a_batch(make_policy):
    settings = TrajectorySettings(noise_level=0.7)
    batched = make_policy(micro_batch_size=3).sample_trajectory(PROMPTS, SEEDS, settings, decode=False)
    alone = make_policy().sample_trajectory(PROMPTS[2:], SEEDS[2:], settings, decode=False)
    torch.testing.assert_close(batched.latents[2:], alone.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.log_probs[2:], alone.log_probs, atol=1e-4, rtol=0)


def test_window_steps_are_stochastic_and_a_deterministic_window_is_sample(make_policy):
    policy = make_policy()
    windowed = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(0.7, window=(1, 3)))
    assert windowed.steps == [1, 2] and windowed.frames.shape == (2, 9, 3, 32, 32)
    assert torch.isnan(windowed.log_probs[:, [0, 3]]).all() and torch.isfinite(windowed.log_probs[:, [1, 2]]).all()
    deterministic = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(0.7, window=(0, 0)))
    assert deterministic.steps == [] and torch.isnan(deterministic.log_probs).all()
    sampled = policy.sample(PROMPTS[:2], SEEDS[:2])
    torch.testing.assert_close(deterministic.latents[:, -1], sampled.latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(deterministic.latents[:, :2], windowed.latents[:, :2])  # same noise, same first step
    assert (windowed.latents[:, -1] - sampled.latents).abs().max() > 1e-3
