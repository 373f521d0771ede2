"""Trajectories (GRPO) of the cogvideox policy: DDIM with eta on the v-prediction, recorded log-densities, re-evaluated
transitions, windows, and agreement with ``sample`` (2b, DDIM) and the DDIM-eta choice on DPM checkpoints (5b)."""

from __future__ import annotations

import math

import pytest
import torch
from vpo_core import BuildContext, TrajectorySettings
from vpo_cogvideox import CogVideoXConfig, build, build_tiny_cogvideox

PROMPTS = ["a cat running", "a red car in the city", "a dog swimming"]
SEEDS = [21, 22, 23]
SETTINGS = dict(num_frames=9, height=32, width=32, num_inference_steps=4, guidance_scale=6.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox-trajectories")
    return {variant: build_tiny_cogvideox(root / variant, variant=variant) for variant in ("2b", "5b")}


def make_policy(directory, **overrides):
    policy = build(CogVideoXConfig(model=str(directory), **{**SETTINGS, **overrides}),
                   BuildContext(device=torch.device("cpu"), seed=0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter an effect so that gradients reach LoRA A too
        for parameter in policy.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return policy


def ddpo_log_prob(x, v, x_next, alpha, alpha_prev, eta):
    """DDPO's ddim_with_logprob for a v-prediction model, written out (not through vpo_core.sampling)."""
    x0 = math.sqrt(alpha) * x - math.sqrt(1 - alpha) * v
    eps = math.sqrt(alpha) * v + math.sqrt(1 - alpha) * x
    std = eta * math.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    mean = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - std**2) * eps
    density = -((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(1)


def test_recorded_log_probs_are_ddim_eta_gaussians_and_the_last_step_is_deterministic(tiny):
    policy = make_policy(tiny["2b"])
    trajectory = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(noise_level=1.0), decode=False)
    # The last step goes to alpha-bar 1 (set_alpha_to_one): std 0, so it is deterministic and not a GRPO step.
    assert trajectory.latents.shape == (2, 5, 3, 4, 8, 8) and trajectory.steps == [0, 1, 2]
    assert torch.isnan(trajectory.log_probs[:, 3]).all()
    scheduler = policy.scheduler
    scheduler.set_timesteps(4)
    embeds = torch.cat([policy.embed_prompts([""]).expand(2, -1, -1), policy.embed_prompts(PROMPTS[:2])])
    for i, t in enumerate(scheduler.timesteps[:3].tolist()):
        x = trajectory.latents[:, i]
        with torch.no_grad():
            uncond, text = policy.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=embeds,
                                              timestep=torch.tensor([t] * 4)).sample.chunk(2)
        v = uncond + 6.0 * (text - uncond)
        alpha = scheduler.alphas_cumprod[t].item()
        alpha_prev = scheduler.alphas_cumprod[t - 250].item() if t >= 250 else 1.0
        expected = ddpo_log_prob(x, v, trajectory.latents[:, i + 1], alpha, alpha_prev, 1.0)
        torch.testing.assert_close(trajectory.log_probs[:, i], expected, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_transitions_recompute_the_recorded_log_probs_with_a_graph_to_lora_only(tiny, variant):
    # 5b: CogVideoXDPMScheduler checkpoint, sampled with the same DDIM-eta transitions; dynamic CFG per row.
    policy = make_policy(tiny[variant], use_dynamic_cfg=variant == "5b", micro_batch_size=3)
    trajectory = policy.sample_trajectory(PROMPTS, SEEDS, TrajectorySettings(noise_level=0.8), decode=False)
    rows, steps = [0, 1, 2, 2], [0, 2, 1, 0]
    transition = policy.transition(trajectory, rows, steps)
    recorded = trajectory.log_probs[rows, steps]
    print(f"{variant}: max |transition - recorded| log-prob: {(transition.log_prob - recorded).abs().max():.2e}")
    torch.testing.assert_close(transition.log_prob.detach(), recorded, atol=1e-5, rtol=1e-6)
    transition.log_prob.sum().backward()
    lora = {id(p) for p in policy.trainable_parameters()}
    for name, parameter in policy.transformer.named_parameters():
        assert (parameter.grad is not None) == (id(parameter) in lora), name
    assert all(p.grad is None for m in (policy.vae, policy.text_encoder) for p in m.parameters())


def test_a_row_alone_equals_the_row_in_a_batch(tiny):
    settings = TrajectorySettings(noise_level=1.0)
    batched = make_policy(tiny["2b"], micro_batch_size=3).sample_trajectory(PROMPTS, SEEDS, settings, decode=False)
    alone = make_policy(tiny["2b"]).sample_trajectory(PROMPTS[1:2], SEEDS[1:2], settings, decode=False)
    torch.testing.assert_close(batched.latents[1:2], alone.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.log_probs[1:2], alone.log_probs, atol=1e-4, rtol=0, equal_nan=True)


def test_window_steps_are_stochastic_and_a_deterministic_window_is_sample(tiny):
    policy = make_policy(tiny["2b"])
    windowed = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(1.0, window=(1, 3)))
    assert windowed.steps == [1, 2] and windowed.frames.shape == (2, 9, 3, 32, 32)
    assert torch.isfinite(windowed.log_probs[:, 1:3]).all() and torch.isnan(windowed.log_probs[:, [0, 3]]).all()
    deterministic = policy.sample_trajectory(PROMPTS[:2], SEEDS[:2], TrajectorySettings(1.0, window=(0, 0)))
    assert deterministic.steps == []
    sampled = policy.sample(PROMPTS[:2], SEEDS[:2])  # CogVideoXDDIMScheduler, eta 0
    torch.testing.assert_close(deterministic.latents[:, -1], sampled.latents, atol=1e-5, rtol=0)
    assert (windowed.latents[:, -1] - sampled.latents).abs().max() > 1e-3
