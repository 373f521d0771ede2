"""Tiny Wan specs through the real training loop: OnlineVPO (dpo + best_worst) on both Wan 2.2 A14B experts and
VADER (reward_gradient) on Wan 2.1, with the core's differentiable toy reward."""

from __future__ import annotations

import json

import pytest
import torch
import vpo_core.testing
from safetensors.torch import load_file
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import policy_loop_spec

import vpo_wan.plugin
from vpo_wan import build_tiny_wan

PARTS = {"toy": vpo_core.testing, "wan": vpo_wan.plugin, "onlinevpo": pytest.importorskip("vpo_onlinevpo.plugin"),
         "vader": pytest.importorskip("vpo_vader.plugin")}
PAIRS = """\
selector: {type: best_worst, key: toy.brightness, min_gap: 0.0}
objective: {type: dpo, beta: 500, reference_update_every: 0}
train: {steps: 2, prompts_per_step: 2, candidates_per_prompt: 2, learning_rate: 0.01}
"""
ROLLOUT = """\
objective: {type: reward_gradient, cutoff: last, frames: one_random, rewards: {toy.brightness: {mode: maximize}}}
train: {steps: 2, prompts_per_step: 2, learning_rate: 0.05}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-loop")
    return {variant: build_tiny_wan(root / variant, variant=variant) for variant in ("2.1", "2.2-a14b")}


def train(tmp_path, model, section):
    manager = PluginManager(load_entrypoints=False)
    for name, module in PARTS.items():
        manager.register_plugin(module, name)
    spec = tmp_path / "spec.yaml"
    policy = (f"{{type: wan, model: {model}, num_frames: 9, height: 32, width: 32, num_inference_steps: 4, "
              "micro_batch_size: 2, lora: {rank: 4}}")
    spec.write_text(policy_loop_spec(tmp_path / "run", policy, 4, section))
    result = Trainer(load_spec(spec, manager), progress=False).run()
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    steps = [row for row in map(json.loads, lines) if row.get("step", 0) > 0 and "loss" in row and not row.get("final")]
    return result.output_dir / "final", steps


def moved(lora_file) -> bool:
    """LoRA B starts at zero: non-zero B means the objective's gradient reached the adapter."""
    return any(v.abs().sum() > 0 for k, v in load_file(str(lora_file)).items() if "lora_B" in k)


def test_online_dpo_trains_both_wan_22_experts(tmp_path, tiny):
    final, steps = train(tmp_path, tiny["2.2-a14b"], PAIRS)
    assert len(steps) == 2 and all(s["skipped"] == 0 and s["pairs"] == 2 for s in steps)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert moved(final / "pytorch_lora_weights.safetensors")
    assert moved(final / "pytorch_lora_weights_transformer_2.safetensors")


def test_vader_reward_gradient_trains_wan_21_lora(tmp_path, tiny):
    final, steps = train(tmp_path, tiny["2.1"], ROLLOUT)
    assert len(steps) == 2 and all(s["skipped"] == 0 for s in steps)
    assert all(s["objective/grad_steps"] == 1 and s["objective/decoded_frames"] == 1 for s in steps)
    assert moved(final / "pytorch_lora_weights.safetensors")
