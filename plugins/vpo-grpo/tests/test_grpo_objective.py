"""The grpo objective on the pure-torch toy policy (vpo_core.testing): log-densities, ratios, gradients, KL,
advantages, the steps it trains, and runs through the real loop."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from vpo_core import BuildContext, StepContext, TrajectoryBatch, TrajectorySettings, hookimpl
from vpo_core.errors import SpecErrors
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import TOY_SPEC, ToyPolicy, ToyPolicyConfig

import vpo_core.testing
from vpo_grpo import GRPOConfig, GRPOObjective, group_advantages

CPU = BuildContext(device=torch.device("cpu"), seed=0)
PROMPTS = ["a red ball", "a blue cube"]
G = 4


def sample(policy, noise_level=1.0, window=None):
    rows = [p for p in PROMPTS for _ in range(G)]
    return policy.sample_trajectory(rows, list(range(10, 10 + len(rows))), TrajectorySettings(noise_level, window))


def batch_of(trajectory, scores):
    groups = [i // G for i in range(len(trajectory.prompts))]
    return TrajectoryBatch(trajectory, trajectory.prompts, {"r": scores}, groups, {"r": scores.view(-1, G)})


def ctx(step=1, update=0):
    return StepContext(step=step, generator=torch.Generator().manual_seed(0), score=None, update=update)


def test_recorded_log_density_equals_an_independent_gaussian_density():
    policy = ToyPolicy(ToyPolicyConfig(steps=4), CPU)
    traj = sample(policy, noise_level=0.8)
    assert traj.steps == [0, 1, 2]  # the last step (into alpha-bar 1) has std 0: deterministic, not trainable
    schedule = torch.linspace(policy.config.train_timesteps - 1, 0, 4).long()
    for i in traj.steps:
        x, t = traj.latents[:, i], schedule[i]
        a = policy.alphas_cumprod[t]
        a_prev = policy.alphas_cumprod[schedule[i + 1]]
        with torch.no_grad():
            eps = policy._eps(x, torch.full((x.shape[0],), int(t)), traj.prompts)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        # DDPO's DDIM-with-eta transition, written out here
        sigma = 0.8 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        density = torch.distributions.Normal(mean, sigma).log_prob(traj.latents[:, i + 1]).flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[:, i], density, atol=1e-5, rtol=1e-5)
    assert torch.isnan(traj.log_probs[:, 3]).all()


def test_trajectories_are_reproducible_per_row_and_a_closed_window_is_the_plain_sampler():
    policy = ToyPolicy(ToyPolicyConfig(), CPU)
    both = sample(policy)
    alone = policy.sample_trajectory([PROMPTS[1]], [10 + G], TrajectorySettings(1.0))
    torch.testing.assert_close(alone.latents[0], both.latents[G], atol=1e-6, rtol=0)
    closed = sample(policy, window=(0, 0))
    assert closed.steps == [] and torch.isnan(closed.log_probs).all()
    plain = policy.sample(closed.prompts, closed.seeds).latents
    torch.testing.assert_close(closed.latents[:, -1], plain, atol=1e-6, rtol=0)


def test_unchanged_weights_give_ratio_one_and_the_plain_policy_gradient():
    policy = ToyPolicy(ToyPolicyConfig(), CPU)
    traj = sample(policy)
    scores = torch.arange(len(traj.seeds), dtype=torch.float32) % 3
    objective = GRPOObjective(GRPOConfig(clip_range=0.1, timestep_fraction=1.0, rewards={"r": 1.0}))
    transitions = objective.expand(batch_of(traj, scores), ctx())
    out = objective.loss(policy, transitions, ctx())
    assert out.metrics["ratio_min"] == pytest.approx(1.0, abs=1e-6) and out.metrics["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert out.metrics["clip_fraction"] == 0.0
    out.loss.backward()
    clipped = [p.grad.clone() for p in policy.trainable_parameters()]
    policy.trainable.module.zero_grad()
    new = policy.transition(traj, transitions.rows, transitions.steps).log_prob
    (-(transitions.advantages * new).mean()).backward()  # REINFORCE: -E[A * grad log p]
    for a, b in zip(clipped, (p.grad for p in policy.trainable_parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_kl_is_zero_against_an_identical_reference_and_positive_after_an_update():
    policy = ToyPolicy(ToyPolicyConfig(), CPU)
    traj = sample(policy)
    objective = GRPOObjective(GRPOConfig(kl_beta=1.0, timestep_fraction=1.0, rewards={"r": 1.0}))
    transitions = objective.expand(batch_of(traj, torch.randn(len(traj.seeds))), ctx())
    assert objective.loss(policy, transitions, ctx()).metrics["kl"] == 0.0
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01)
    assert objective.loss(policy, transitions, ctx()).metrics["kl"] > 0


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    per_prompt = group_advantages(scores, groups, scores.view(2, 2), "per_prompt", clip=5.0)
    # group 0: mean 2, population std 1 -> (-1, 1) / 1.0001; group 1: std 0 -> 0
    torch.testing.assert_close(per_prompt, torch.tensor([-1, 1, 0, 0]) / 1.0001)
    global_std = group_advantages(scores, groups, scores.view(2, 2), "global", clip=0.5)
    std = scores.std(unbiased=False).item()
    torch.testing.assert_close(global_std, torch.tensor([-1 / (std + 1e-4), 0.5, 0, 0]).clamp(-0.5, 0.5))


def test_the_steps_trained_follow_timestep_fraction_and_order():
    policy = ToyPolicy(ToyPolicyConfig(steps=6), CPU)
    traj = sample(policy)
    scores = torch.randn(len(traj.seeds))
    first = GRPOObjective(GRPOConfig(timestep_fraction=0.5, timestep_order="first", rewards={"r": 1.0})).expand(batch_of(traj, scores),
                                                                                           ctx())
    assert first.steps == [0, 1] * len(traj.seeds)  # int(5 stochastic steps * 0.5) = 2, in denoising order
    random = GRPOObjective(GRPOConfig(timestep_fraction=0.6, rewards={"r": 1.0}))
    a, b = random.expand(batch_of(traj, scores), ctx()), random.expand(batch_of(traj, scores), ctx(update=1))
    rows_a = [a.steps[3 * i:3 * i + 3] for i in range(len(traj.seeds))]
    assert all(len(set(r)) == 3 and set(r) <= set(traj.steps) for r in rows_a)
    assert len({tuple(r) for r in rows_a}) > 1 and a.steps != b.steps  # per sample, and fresh per update
    assert random.expand(batch_of(traj, scores), ctx()).steps == a.steps  # reproducible


SPEC = TOY_SPEC.replace("selector:\n  type: toy_best_worst\n", "").replace(
    "objective:\n  type: toy_dpo\n  beta: 50\n",
    "objective:\n  type: grpo\n  noise_level: 1.0\n  clip_range: 0.2\n  timestep_fraction: 1.0\n")


@pytest.fixture
def pm():
    import vpo_grpo.plugin

    manager = PluginManager(load_entrypoints=False)
    manager.register_plugin(vpo_core.testing, "toy")
    manager.register_plugin(vpo_grpo.plugin, "grpo")
    return manager


def run(tmp_path, pm, *overrides):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "out"))
    return Trainer(load_spec(spec, pm, list(overrides)), progress=False).run()


def test_grpo_through_the_loop_raises_the_reward_and_logs_its_statistics(tmp_path, pm):
    import json

    result = run(tmp_path, pm, "train.candidates_per_prompt=4", "train.steps=6",
                 "objective.rewards={toy_brightness.brightness: 1.0}", "objective.inner_epochs=2")
    rows = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert all(r["skipped"] == 0 for r in trained)
    keys = {"objective/clip_fraction", "objective/approx_kl", "objective/ratio_mean", "objective/group_reward_std"}
    assert keys <= set(trained[0])
    assert any(r["objective/ratio_max"] != 1.0 for r in trained)  # the 2nd inner epoch sees updated weights
    before, after = rows[0]["eval/toy_brightness.brightness"], rows[-1]["eval/toy_brightness.brightness"]
    assert after > before


def test_a_policy_without_trajectories_is_refused_before_anything_loads(tmp_path, pm):
    class NoTrajectories(ToyPolicyConfig):
        capabilities: ClassVar[frozenset[str]] = frozenset()

    class Plugin:
        @hookimpl
        def vpo_register_policies(self, register):
            register("plain_toy", lambda config, context: pytest.fail("built"), NoTrajectories)

    pm.register_plugin(Plugin(), "plain")
    with pytest.raises(SpecErrors, match="does not offer \\(capability 'trajectories'\\)"):
        run(tmp_path, pm, "policy={type: plain_toy}")
