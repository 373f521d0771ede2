"""examples/onlinevpo-cogvideox-2b.yaml is a valid spec whose selector ranks by a score key the rewards make."""

from __future__ import annotations

from pathlib import Path

from vpo_core.testing import validated_example

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "onlinevpo-cogvideox-2b.yaml"


def test_example_validates_with_the_paper_settings():
    r = validated_example(EXAMPLE, "online pairs", needs=("vpo_cogvideox", "vpo_videoscore", "vpo_onlinevpo"))
    (reward,) = r.rewards
    assert (r.policy.config.model, r.policy.config.num_inference_steps) == ("THUDM/CogVideoX-2b", 30)
    assert reward.config.model == "TIGER-Lab/VideoScore-v1.1"
    assert r.selector.config.key in {f"{reward.name}.{d}" for d in reward.config.dimensions}
    assert r.objective.config.reference_update_every == 200 and r.spec.train.candidates_per_prompt == 4
    t = r.spec.train
    assert t.learning_rate == 1e-5 and t.prompts_per_step * t.gradient_accumulation_steps == 8
    assert len([line for line in (ROOT / r.spec.data.prompts_file).read_text().splitlines()
                if line.strip() and not line.startswith("#")]) >= 24
