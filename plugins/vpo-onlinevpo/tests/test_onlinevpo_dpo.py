"""The dpo objective: the Diffusion-DPO formula on known per-sample losses, the curriculum reference update
(exact steps, toy and tiny CogVideoX policies), state round trip, and short runs through the core Trainer."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import vpo_core.testing
from safetensors.torch import load_file
from vpo_core import BuildContext, Objective, PairBatch, StepContext
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import ToyPolicy, ToyPolicyConfig

import vpo_onlinevpo.plugin
from vpo_onlinevpo import DPOConfig, DPOObjective

CPU = BuildContext(device=torch.device("cpu"), seed=0)


class StubPolicy:
    """denoising_loss returns fixed per-sample losses: winners then losers, policy or reference."""

    def __init__(self, model, ref):
        self.model = torch.tensor(model, requires_grad=True)
        self.ref = torch.tensor(ref)
        self._ref = False
        self.timesteps_drawn = []

    def sample_timesteps(self, batch_size, generator):
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        self.timesteps_drawn.append(t)
        return t

    def sample_noise(self, latents, generator):
        return torch.randn(latents.shape, generator=generator)

    def denoising_loss(self, latents, prompts, timesteps, noise):
        assert latents.shape[0] == len(prompts) == timesteps.shape[0] == noise.shape[0]
        return self.ref.clone() if self._ref else self.model * 1.0

    @contextlib.contextmanager
    def use_reference(self):
        self._ref = True
        try:
            yield
        finally:
            self._ref = False


def context(step=1, seed=0):
    return StepContext(step=step, generator=torch.Generator().manual_seed(seed), score=None)


def pair_batch(b=2, weights=None, margins=None):
    g = torch.Generator().manual_seed(1)
    return PairBatch(torch.randn(b, 3, 4, 2, 2, generator=g), torch.randn(b, 3, 4, 2, 2, generator=g),
                     [f"prompt {i}" for i in range(b)], torch.ones(b) if weights is None else torch.tensor(weights),
                     None if margins is None else torch.tensor(margins))


@pytest.mark.parametrize("shared_noise", [True, False])
def test_loss_equals_the_diffusion_dpo_formula(shared_noise):
    # per-sample losses [winner0, winner1, loser0, loser1]
    model, ref = [0.30, 0.50, 0.32, 0.40], [0.31, 0.45, 0.30, 0.46]
    weights, beta = [1.0, 0.5], 5000.0
    policy = StubPolicy(model, ref)
    objective = DPOObjective(DPOConfig(beta=beta, shared_noise=shared_noise, reference_update_every=0))
    out = objective.loss(policy, pair_batch(weights=weights, margins=[0.25, 0.75]), context())

    expected, correct = 0.0, 0
    for i in range(2):
        d_theta = model[i] - model[i + 2]
        d_ref = ref[i] - ref[i + 2]
        x = -0.5 * beta * (d_theta - d_ref)
        expected += -weights[i] * math.log(1 / (1 + math.exp(-x)))  # -w * logsigmoid(x)
        correct += d_theta < d_ref
    expected /= 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["implicit_accuracy"] == correct / 2 == 0.5
    assert out.metrics["reward_margin"] == pytest.approx(0.5)
    out.loss.backward()
    assert policy.model.grad is not None and policy.model.grad.abs().sum() > 0
    # shared noise draws one timestep per pair; independent draws one per sample
    assert sum(t.shape[0] for t in policy.timesteps_drawn) == (2 if shared_noise else 4)


def test_defaults_follow_the_papers():
    config = DPOConfig()
    assert (config.beta, config.shared_noise, config.reference_update_every) == (5000.0, True, 200)
    assert DPOConfig.requires == "pairs" and issubclass(DPOObjective, Objective)


# ----------------------------------------------------------------------------------------------- curriculum
def fixed_loss(policy, latents, prompts):
    g = torch.Generator().manual_seed(123)
    t = policy.sample_timesteps(latents.shape[0], g)
    noise = policy.sample_noise(latents, g)
    with torch.no_grad():
        return policy.denoising_loss(latents, prompts, t, noise)


def reference_trace(policy, batch, k, steps, lr):
    """Train `steps` DPO steps; return the reference's and the policy's loss on a fixed batch after each."""
    objective = DPOObjective(DPOConfig(beta=50.0, reference_update_every=k))
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    latents = torch.cat([batch.winner_latents, batch.loser_latents])
    prompts = batch.prompts * 2
    refs, models, updates = [], [], []
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        objective.loss(policy, batch, context(step, seed=step)).loss.backward()
        optimizer.step()
        updates.append(objective.after_optimizer_step(step, policy)["reference_updated"])
        with policy.use_reference():
            refs.append(fixed_loss(policy, latents, prompts))
        models.append(fixed_loss(policy, latents, prompts))
    return refs, models, updates


def assert_reference_changes_exactly_at(refs, models, updates, initial_ref, k):
    previous = initial_ref
    for step, (ref, model, updated) in enumerate(zip(refs, models, updates), start=1):
        if step % k == 0:
            assert updated == 1.0 and not torch.equal(ref, previous), f"no reference update at step {step}"
            assert torch.allclose(ref, model), "after an update the reference equals the policy"
        else:
            assert updated == 0.0 and torch.equal(ref, previous), f"reference changed at step {step}"
            assert not torch.allclose(ref, model)
        previous = ref


def test_reference_updates_exactly_every_k_steps_toy():
    policy = ToyPolicy(ToyPolicyConfig(), CPU)
    batch = PairBatch(torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8), ["a red ball", "a blue cube"],
                      torch.ones(2))
    latents = torch.cat([batch.winner_latents, batch.loser_latents])
    with policy.use_reference():
        initial = fixed_loss(policy, latents, batch.prompts * 2)
    refs, models, updates = reference_trace(policy, batch, k=3, steps=7, lr=1e-2)
    assert_reference_changes_exactly_at(refs, models, updates, initial, k=3)


def test_reference_updates_exactly_every_k_steps_tiny_cogvideox(tmp_path):
    cogvideox = pytest.importorskip("vpo_cogvideox")
    directory = cogvideox.build_tiny_cogvideox(tmp_path / "tiny", seed=0)
    config = cogvideox.CogVideoXConfig(model=str(directory), num_frames=9, height=32, width=32,
                                       num_inference_steps=2)
    policy = cogvideox.build(config, CPU)
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g),
                      ["a cat running", "a red car"], torch.ones(2))
    latents = torch.cat([batch.winner_latents, batch.loser_latents])
    with policy.use_reference():
        initial = fixed_loss(policy, latents, batch.prompts * 2)
    refs, models, updates = reference_trace(policy, batch, k=2, steps=5, lr=5e-2)
    assert_reference_changes_exactly_at(refs, models, updates, initial, k=2)


def test_skipped_update_step_catches_up_and_state_round_trips():
    calls = []

    class Recorder:
        def update_reference(self):
            calls.append(True)

    objective = DPOObjective(DPOConfig(reference_update_every=4))
    got = [s for s in (1, 2, 3, 5, 6, 7, 8, 9, 13) if objective.after_optimizer_step(s, Recorder())["reference_updated"]]
    assert got == [5, 8, 13]  # step 4 was skipped by the loop: the update comes after step 5
    state = json.loads(json.dumps(objective.state_dict()))
    resumed = DPOObjective(DPOConfig(reference_update_every=4))
    resumed.load_state_dict(state)
    assert resumed.after_optimizer_step(14, Recorder())["reference_updated"] == 0.0
    assert resumed.after_optimizer_step(16, Recorder())["reference_updates"] == 4.0
    assert DPOObjective(DPOConfig(reference_update_every=0)).after_optimizer_step(200, Recorder()) == {}


# ----------------------------------------------------------------------------------------------- Trainer
SPEC = """\
output_dir: {out}
seed: 5
policy: {{type: toy}}
rewards: [{{type: toy_brightness, name: toy}}]
selector: {{type: best_worst, key: toy.brightness, min_gap: 0.0}}
objective: {{type: dpo, beta: 50, reference_update_every: 3}}
data:
  prompts: [a red ball, a blue cube, a green cone, a dark sky]
train: {{steps: 6, prompts_per_step: 2, candidates_per_prompt: 3, learning_rate: 0.003}}
checkpoint: {{every: 2, keep_last: 5}}
eval: {{videos: 0}}
logging: {{trackers: []}}
"""


@pytest.fixture
def pm():
    manager = PluginManager(load_entrypoints=False)
    manager.register_plugin(vpo_core.testing, "toy")
    manager.register_plugin(vpo_onlinevpo.plugin, "onlinevpo")
    return manager


def run(tmp_path, pm, *overrides, resume=False, out="out"):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / out))
    return Trainer(load_spec(spec, pm, list(overrides)), resume=resume, progress=False).run()


def test_trainer_runs_online_dpo_with_curriculum(tmp_path, pm):
    result = run(tmp_path, pm)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert len(trained) == 6 and all(r["skipped"] == 0 for r in trained)
    assert all(r["pairs"] == 2 and "objective/implicit_accuracy" in r and "objective/reward_margin" in r
               for r in trained)
    assert [r["objective/reference_updated"] for r in trained] == [0, 0, 1, 0, 0, 1]
    ckpts = result.output_dir / "checkpoints"
    step4 = load_file(str(ckpts / "step-000004" / "policy.safetensors"))
    step6 = load_file(str(ckpts / "step-000006" / "policy.safetensors"))
    assert not torch.equal(step4["module.out.weight"], step4["reference.out.weight"])
    assert torch.equal(step6["module.out.weight"], step6["reference.out.weight"])


def test_trainer_resume_keeps_the_curriculum(tmp_path, pm):
    straight = run(tmp_path, pm, out="straight")
    run(tmp_path, pm, "train.steps=4", out="resumed")
    resumed = run(tmp_path, pm, resume=True, out="resumed")
    a = load_file(str(straight.output_dir / "checkpoints" / "step-000006" / "policy.safetensors"))
    b = load_file(str(resumed.output_dir / "checkpoints" / "step-000006" / "policy.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
