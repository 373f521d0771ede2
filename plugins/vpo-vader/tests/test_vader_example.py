"""examples/vader-cogvideox-2b.yaml is a valid spec whose objective reads a score key the rewards make."""

from __future__ import annotations

from pathlib import Path

from vpo_core.testing import validated_example

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "vader-cogvideox-2b.yaml"


def test_example_validates_with_vader_settings():
    r = validated_example(EXAMPLE, "rollout", needs=("vpo_cogvideox", "vpo_hpsv2", "vpo_vader"))
    (reward,) = r.rewards
    assert reward.part_type.name == "hpsv2" and list(r.objective.config.rewards) == [f"{reward.name}.score"]
    assert (r.policy.config.model, r.policy.config.num_inference_steps) == ("THUDM/CogVideoX-2b", 25)
    assert (r.objective.config.cutoff, r.objective.config.last_steps) == ("last", 1)
    t = r.spec.train
    assert (t.learning_rate, t.prompts_per_step, t.gradient_accumulation_steps) == (2e-4, 1, 8)
