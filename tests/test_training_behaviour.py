"""Behaviours users rely on without seeing them: accumulation averages, every step draws fresh noise (the same
again after a resume), the Diffusion-DPO sign, RNG state. (A checkpoint write failing half-way:
test_reliability.test_disk_full_while_checkpointing_keeps_the_previous_checkpoint; the `total` formula:
test_reliability.test_total_weighs_every_reward_as_documented.)"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from vpo_core import hookimpl
from vpo_core.dpo import diffusion_dpo_loss
from vpo_core.loop import Trainer
from vpo_core.offline import build_pair_dataset
from vpo_core.spec import load_spec
from vpo_core.testing import ToyPolicy, ToyPolicyConfig


def run(spec, pm, *overrides, resume=False):
    return Trainer(load_spec(spec, pm, list(overrides)), resume=resume, progress=False).run()


def weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(result.output_dir / "final" / "toy.safetensors"))


@pytest.fixture
def grads_at_step(monkeypatch):
    """The gradients the optimizer sees at each step (before AdamW, which is blind to a gradient's scale)."""
    seen: list[list[torch.Tensor]] = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


# ----------------------------------------------------------------------------------------------- 1
def test_gradient_accumulation_is_an_average_for_dpo(toy_spec, toy_pm, tmp_path, grads_at_step):
    pairs = build_pair_dataset(load_spec(toy_spec, toy_pm), tmp_path / "pairs", progress=False)
    common = [f"data.pairs={pairs}", "train.steps=1", "train.max_grad_norm=null"]
    runs = {}
    for k, m in ((1, 4), (2, 2), (4, 1)):  # k micro-steps of m pairs
        runs[k] = run(toy_spec, toy_pm, *common, f"train.pairs_per_step={m}",
                      f"train.gradient_accumulation_steps={k}", f"output_dir={tmp_path / f'k{k}'}")
    assert len(grads_at_step) == 3
    for grads in grads_at_step[1:]:  # equal up to float summation order (a sum would be k times larger)
        for a, b in zip(grads_at_step[0], grads, strict=True):
            assert (a - b).norm() <= 1e-5 * a.norm()
    assert any(g.abs().sum() > 0 for g in grads_at_step[0])
    for k in (2, 4):
        for name, value in weights(runs[1]).items():
            torch.testing.assert_close(weights(runs[k])[name], value, atol=1e-6, rtol=0)


def test_gradient_accumulation_is_an_average_for_reward_gradients(toy_spec, toy_pm, tmp_path, grads_at_step):
    common = ["objective={type: toy_reward_gradient, last_steps: 2}", "train.steps=1", "train.max_grad_norm=null"]
    run(toy_spec, toy_pm, *common, "train.prompts_per_step=4", f"output_dir={tmp_path / 'one'}")
    run(toy_spec, toy_pm, *common, "train.prompts_per_step=2", "train.gradient_accumulation_steps=2",
        f"output_dir={tmp_path / 'two'}")
    for a, b in zip(*grads_at_step, strict=True):
        assert (a - b).norm() <= 1e-5 * a.norm()


# ----------------------------------------------------------------------------------------------- 2
class SpyPolicy(ToyPolicy):
    """Records every training timestep and noise draw."""

    draws: list[tuple[list[int], torch.Tensor]] = []

    def sample_timesteps(self, batch_size, generator):
        t = super().sample_timesteps(batch_size, generator)
        SpyPolicy.draws.append((t.tolist(), None))
        return t

    def sample_noise(self, latents, generator):
        noise = super().sample_noise(latents, generator)
        SpyPolicy.draws[-1] = (SpyPolicy.draws[-1][0], noise.clone())
        return noise


class SpyPlugin:
    @hookimpl
    def vpo_register_policies(self, register):
        register("spy_toy", SpyPolicy, ToyPolicyConfig)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_each_step_and_micro_step_draws_fresh_noise_and_a_resume_redraws_the_same(mode, toy_spec, toy_pm, tmp_path):
    toy_pm.register_plugin(SpyPlugin(), "spy")
    common = ["policy={type: spy_toy}", "train.gradient_accumulation_steps=2", "train.prompts_per_step=1",
              "checkpoint.every=2"]
    if mode == "offline":
        pairs = build_pair_dataset(load_spec(toy_spec, toy_pm), tmp_path / "pairs", progress=False)
        common.append(f"data.pairs={pairs}")
    SpyPolicy.draws = []
    run(toy_spec, toy_pm, *common, "train.steps=4", f"output_dir={tmp_path / 'straight'}")
    straight = SpyPolicy.draws
    assert len(straight) >= 6  # one draw per pair: every micro-step of every step found its pair
    noises = [n for _, n in straight]
    assert all(not torch.equal(a, b) for i, a in enumerate(noises) for b in noises[i + 1:])
    SpyPolicy.draws = []
    run(toy_spec, toy_pm, *common, "train.steps=2", f"output_dir={tmp_path / 'resumed'}")
    first_half = len(SpyPolicy.draws)
    run(toy_spec, toy_pm, *common, "train.steps=4", f"output_dir={tmp_path / 'resumed'}", resume=True)
    again = SpyPolicy.draws[first_half:]
    assert [t for t, _ in again] == [t for t, _ in straight[first_half:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, straight[first_half:], strict=True))


# ----------------------------------------------------------------------------------------------- 7
def test_data_order_is_a_stream_of_epoch_permutations_read_from_any_position():
    from vpo_core.data import ordered_indices

    stream = ordered_indices(5, 7, 0, 15)  # three epochs
    assert all(sorted(stream[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(3))
    assert len({tuple(stream[e * 5:(e + 1) * 5]) for e in range(3)}) > 1  # each epoch reshuffled
    pieces = [ordered_indices(5, 7, start, count) for start, count in ((0, 3), (3, 4), (7, 1), (8, 7))]
    assert [i for piece in pieces for i in piece] == stream  # any split (micro-steps, processes, a resume)
    assert ordered_indices(5, 8, 0, 15) != stream


def test_checkpoint_rng_state_round_trip():
    from vpo_core.checkpoint import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved, tensors = rng_state(), {"rng.torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(saved, tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_resume_does_not_depend_on_the_global_rng_state(toy_spec, toy_pm, tmp_path):
    """The loop re-seeds torch from (seed, step) every step and derives every other draw from the seed and the
    data position, so whatever happened to the global RNGs between stop and resume changes nothing."""
    straight = run(toy_spec, toy_pm, f"output_dir={tmp_path / 'straight'}")
    run(toy_spec, toy_pm, "train.steps=2", f"output_dir={tmp_path / 'resumed'}")
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    torch.rand(1000)
    resumed = run(toy_spec, toy_pm, f"output_dir={tmp_path / 'resumed'}", resume=True)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- the loss
def test_diffusion_dpo_loss_against_hand_computed_values():
    # pair 0: the policy denoises the winner better than the reference does (model diff -1 < ref diff 0)
    # pair 1: the other way round. beta = 2: inside = -beta/2 * (d_model - d_ref) = +1 and -1.
    loss, metrics = diffusion_dpo_loss(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]),
                                       torch.tensor([1.5, 1.5]), torch.tensor([1.5, 1.5]), beta=2.0)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2, abs=1e-6)
    assert metrics["implicit_accuracy"] == 0.5
    weighted, _ = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]),
                                     torch.tensor([1.5]), beta=2.0, weights=torch.tensor([3.0]))
    assert weighted.item() == pytest.approx(3 * math.log1p(math.exp(-1)), abs=1e-6)
    # the gradient lowers the winner's loss and raises the loser's
    model_w, model_l = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    diffusion_dpo_loss(model_w, model_l, torch.tensor([1.5]), torch.tensor([1.5]), beta=2.0)[0].backward()
    assert model_w.grad.item() > 0 > model_l.grad.item()


def test_two_identical_runs_write_identical_final_bytes(tmp_path):
    """Set and dict order depend on PYTHONHASHSEED: the saved files must not."""
    import os
    import subprocess
    import sys

    from vpo_core.testing import TOY_SPEC

    spec = tmp_path / "spec.yaml"
    spec.write_text(TOY_SPEC.format(out=tmp_path / "out").replace("steps: 6", "steps: 2"))
    finals = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, VPO_EXTRA_PLUGINS="vpo_core.testing",
                   VPO_LOAD_PLUGINS="none", OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "vpo_core.cli", "run", str(spec), "--no-progress"], env=env, check=True,
                       capture_output=True)
        finals.append({p.name: p.read_bytes() for p in (tmp_path / "out" / "final").iterdir()})
        import shutil

        shutil.rmtree(tmp_path / "out")
    assert finals[0].keys() == {"toy.safetensors", "spec.yaml"} and finals[0] == finals[1]
