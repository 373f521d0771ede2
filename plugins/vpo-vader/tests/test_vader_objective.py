"""reward_gradient: loss shapes, frame selection, truncated backprop (toy and tiny CogVideoX), activation
offloading, the non-differentiable reward check, and short runs through the core Trainer."""

from __future__ import annotations

from typing import ClassVar

import json

import pydantic
import pytest
import torch
import vpo_core.testing
from vpo_core import BuildContext, PromptBatch, Rollout, StepContext, VpoError, hookimpl
from vpo_core.errors import SpecErrors
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import ToyPolicy, ToyPolicyConfig, ToyReward, ToyRewardConfig

import vpo_vader.plugin
from vpo_vader import RewardGradientConfig, RewardGradientObjective

CPU = BuildContext(device=torch.device("cpu"), seed=0)


def objective(**config):
    return RewardGradientObjective(RewardGradientConfig(**config))


def context(score, seed=0):
    return StepContext(step=1, generator=torch.Generator().manual_seed(seed), score=score)


class StubPolicy:
    """Rollout latents [B, F, 3, 2, 2] that require grad; decode records the latent frames it was asked for."""

    def __init__(self, frames=5):
        self.latents = torch.randn(2, frames, 3, 2, 2, requires_grad=True)
        self.decoded = []
        self.windows = []

    def sample(self, prompts, seeds, *, decode=True, gradient=None):
        self.windows.append(gradient)
        return Rollout(latents=self.latents * 1.0, prompts=prompts, seeds=seeds, extras={"grad_steps": 1})

    def decode(self, latents, frame_indices=None):
        self.decoded.append(frame_indices)
        return latents if frame_indices is None else latents[:, frame_indices]


BATCH = PromptBatch(["a red ball", "a blue cube"], [1, 2])


# ----------------------------------------------------------------------------------------------- loss shapes
def test_maximize_and_target_losses_equal_hand_computed_values():
    a, b = torch.tensor([0.2, 0.4]), torch.tensor([9.0, 11.5])
    score = lambda frames, prompts: {"r.a": a * frames.mean() / frames.mean(), "hps.score": b, "total": a + b}
    out = objective(rewards={"r.a": {"scale": 2.0}, "hps.score": {"mode": "target", "target": 10.0, "scale": 0.1}}
                    ).loss(StubPolicy(), BATCH, context(score))
    expected = -2.0 * (0.2 + 0.4) / 2 + 0.1 * (abs(10 - 9.0) + abs(10 - 11.5)) / 2
    assert out.loss.item() == pytest.approx(expected)
    assert out.metrics["loss/r.a"] == pytest.approx(-0.6) and out.metrics["loss/hps.score"] == pytest.approx(0.125)
    assert set(out.scores) == {"r.a", "hps.score", "total"} and not any(v.requires_grad for v in out.scores.values())
    # default: maximize "total"
    default = objective().loss(StubPolicy(), BATCH, context(score))
    assert default.loss.item() == pytest.approx(-(0.2 + 9.0 + 0.4 + 11.5) / 2)


def test_unknown_reward_key_lists_available_keys():
    score = lambda frames, prompts: {"total": frames.mean((1, 2, 3, 4)), "toy.brightness": frames.mean((1, 2, 3, 4))}
    with pytest.raises(VpoError, match=r"'hps.score'.*available keys: \['total', 'toy.brightness'\]"):
        objective(rewards={"hps.score": {}}).loss(StubPolicy(), BATCH, context(score))


def test_config_errors():
    with pytest.raises(pydantic.ValidationError, match="last_k"):
        RewardGradientConfig(cutoff="last", last_steps=3)
    with pytest.raises(pydantic.ValidationError):
        RewardGradientConfig(rewards={"total": {"mode": "minimize"}})
    with pytest.raises(pydantic.ValidationError, match="empty"):
        RewardGradientConfig(rewards={})
    assert RewardGradientConfig.requires == "rollout"


# ----------------------------------------------------------------------------------------------- frames
def brightness(frames, prompts):
    value = frames.mean(dim=(1, 2, 3, 4))
    return {"toy.brightness": value, "total": value}


def test_frame_selection_picks_the_right_latent_frames():
    policy = StubPolicy(frames=7)
    objective(frames="all").loss(policy, BATCH, context(brightness))
    objective(frames="every_nth", every_n=3).loss(policy, BATCH, context(brightness))
    out = objective(frames="one_random").loss(policy, BATCH, context(brightness, seed=42))
    expected = int(torch.randint(0, 7, (1,), generator=torch.Generator().manual_seed(42)))
    assert policy.decoded == [None, [0, 3, 6], [expected]]
    assert out.metrics["frame_index"] == expected and out.metrics["decoded_frames"] == 1
    drawn = {objective(frames="one_random").loss(policy, BATCH, context(brightness, seed=s)).metrics["frame_index"]
             for s in range(20)}
    assert drawn <= set(range(7)) and len(drawn) > 3  # drawn from ctx.generator, not fixed


def test_decoded_frames_are_the_selected_ones_toy():
    policy = ToyPolicy(ToyPolicyConfig(frames=6), CPU)
    seen = []
    score = lambda frames, prompts: seen.append(frames.detach()) or brightness(frames, prompts)
    objective(frames="every_nth", every_n=2).loss(policy, BATCH, context(score))
    full = policy.sample(BATCH.prompts, BATCH.seeds, decode=True).frames
    assert seen[0].shape[1] == 3 and torch.allclose(seen[0], full[:, [0, 2, 4]], atol=1e-6)


# ----------------------------------------------------------------------------------------------- gradients
def record_denoiser_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(
        (torch.is_grad_enabled(), (out[0] if isinstance(out, tuple) else out).requires_grad)))
    return calls, handle


@pytest.mark.parametrize("cutoff,last_steps,expected", [("last", 1, [False, False, False, True]),
                                                        ("last_k", 2, [False, False, True, True])])
def test_gradient_flows_only_through_the_window_toy(cutoff, last_steps, expected):
    policy = ToyPolicy(ToyPolicyConfig(steps=4), CPU)
    calls, handle = record_denoiser_calls(policy.net)
    out = objective(cutoff=cutoff, last_steps=last_steps).loss(policy, BATCH, context(brightness))
    handle.remove()
    assert [grad for grad, _ in calls] == expected
    assert [requires for _, requires in calls] == expected  # no graph at all before the cutoff
    out.loss.backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    # every trainable weight gets a gradient (the time layer's is zero: the last step runs at t = 0)
    assert all(g is not None for g in grads) and sum(bool(g.abs().sum() > 0) for g in grads) >= len(grads) - 1
    assert not any(t.requires_grad for t in policy.trainable.reference_copy.parameters())


def test_random_cutoff_stays_within_last_steps():
    policy = StubPolicy()
    objective(cutoff="random", last_steps=3).loss(policy, BATCH, context(brightness))
    window = policy.windows[0]
    assert (window.last_steps, window.random_cutoff, window.checkpointing) == (3, True, True)
    toy = ToyPolicy(ToyPolicyConfig(steps=6), CPU)
    for seed in range(4):
        calls, handle = record_denoiser_calls(toy.net)
        objective(cutoff="random", last_steps=3).loss(toy, PromptBatch(["a red ball"], [seed]), context(brightness))
        handle.remove()
        flags = [g for g, _ in calls]
        k = sum(flags)
        assert 1 <= k <= 3 and flags == [False] * (6 - k) + [True] * k


def test_gradient_reaches_only_lora_and_only_the_last_step_tiny_cogvideox(tmp_path):
    cogvideox = pytest.importorskip("vpo_cogvideox")
    directory = cogvideox.build_tiny_cogvideox(tmp_path / "tiny", seed=0)
    config = cogvideox.CogVideoXConfig(model=str(directory), num_frames=9, height=32, width=32,
                                       num_inference_steps=3, guidance_scale=6.0, micro_batch_size=2)
    policy = cogvideox.build(config, CPU)
    calls, handle = record_denoiser_calls(policy.transformer)
    out = objective(frames="one_random").loss(policy, BATCH, context(brightness))
    handle.remove()
    assert [g for g, _ in calls] == [False, False, True] and [r for _, r in calls] == [False, False, True]
    out.loss.backward()
    trainable = {id(p) for p in policy.trainable_parameters()}
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    others = [p for m in (policy.transformer, policy.vae, policy.text_encoder) for p in m.parameters()
              if id(p) not in trainable]
    assert others and all(p.grad is None for p in others)
    assert out.metrics["grad_steps"] == 1 and out.metrics["decoded_frames"] == 1


def test_offloaded_activations_give_the_same_loss_and_gradients():
    results = []
    for offload in (False, True):
        policy = ToyPolicy(ToyPolicyConfig(steps=3), CPU)
        out = objective(cutoff="last_k", last_steps=2, offload_activations=offload).loss(
            policy, BATCH, context(brightness))
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.allclose(a, b) for a, b in zip(grads_a, grads_b))


# ----------------------------------------------------------------------------------------------- Trainer
SPEC = """\
output_dir: {out}
seed: 2
policy: {{type: toy}}
rewards: [{{type: toy_brightness, name: toy}}]
objective: {{type: reward_gradient, cutoff: last_k, last_steps: 2, frames: every_nth, every_n: 2,
             rewards: {{toy.brightness: {{mode: maximize}}}}}}
data:
  prompts: [a red ball, a blue cube, a green cone, a dark sky]
train: {{steps: 4, prompts_per_step: 2, gradient_accumulation_steps: 2, learning_rate: 0.05}}
checkpoint: {{every: 0}}
eval: {{videos: 0}}
logging: {{trackers: []}}
"""


class FrozenRewardPlugin:
    """A test plugin: a reward that cannot be back-propagated through."""

    class Config(ToyRewardConfig):
        differentiable: ClassVar[bool] = False

    @hookimpl
    def vpo_register_rewards(self, register):
        register("frozen_brightness", ToyReward, self.Config)


@pytest.fixture
def pm():
    manager = PluginManager(load_entrypoints=False)
    manager.register_plugin(vpo_core.testing, "toy")
    manager.register_plugin(vpo_vader.plugin, "vader")
    manager.register_plugin(FrozenRewardPlugin(), "frozen")
    return manager


def run(tmp_path, pm, *overrides):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "out"))
    return Trainer(load_spec(spec, pm, list(overrides)), progress=False).run()


def test_trainer_runs_reward_gradient(tmp_path, pm):
    result = run(tmp_path, pm)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert len(trained) == 4 and all(r["skipped"] == 0 for r in trained)
    assert all(r["objective/decoded_frames"] == 2 and "reward/toy.brightness" in r for r in trained)
    assert trained[-1]["reward/toy.brightness"] > trained[0]["reward/toy.brightness"]  # it maximises brightness


def test_non_differentiable_reward_is_refused_by_name(tmp_path, pm):
    with pytest.raises(SpecErrors, match="reward .frozen. is not differentiable.*reward_gradient"):
        run(tmp_path, pm, "rewards=[{type: frozen_brightness, name: frozen}]",
            "objective.rewards={frozen.brightness: {}}")
