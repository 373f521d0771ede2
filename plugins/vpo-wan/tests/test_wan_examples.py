"""examples/onlinevpo-wan.yaml and examples/vader-wan.yaml validate and name the real Wan 2.1 1.3B checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from vpo_core.testing import validated_example

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name, plugins, mode", [
    ("onlinevpo-wan.yaml", ("vpo_videoscore", "vpo_onlinevpo"), "online pairs"),
    ("vader-wan.yaml", ("vpo_hpsv2", "vpo_vader"), "rollout"),
])
def test_example_validates_on_wan_21_at_480p(name, plugins, mode):
    resolved = validated_example(ROOT / "examples" / name, mode, needs=plugins)
    policy = resolved.policy.config
    assert resolved.policy.part_type.name == "wan" and policy.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (policy.num_frames, policy.height, policy.width, policy.num_inference_steps) == (49, 480, 832, 30)
    assert resolved.spec.train.mixed_precision == "bf16" and policy.vae_slicing == "auto"
    keys = {f"{reward.name}.{d}" for reward in resolved.rewards for d in reward.config.score_dimensions()}
    if mode == "rollout":
        assert set(resolved.objective.config.rewards) <= keys and resolved.objective.config.cutoff == "last"
    else:
        assert resolved.selector.config.key in keys and resolved.spec.train.candidates_per_prompt == 4
