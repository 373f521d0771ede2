"""examples/onlinevpo-opensora.yaml and examples/vader-opensora.yaml are valid specs with the papers' settings."""

from __future__ import annotations

from pathlib import Path

from vpo_core.testing import validated_example

ROOT = Path(__file__).resolve().parents[3]


def load(name, plugins, mode):
    return validated_example(ROOT / "examples" / name, mode, needs=plugins)


def test_onlinevpo_example_has_the_paper_settings():
    r = load("onlinevpo-opensora.yaml", ("vpo_opensora", "vpo_videoscore", "vpo_onlinevpo"),
             "online pairs")
    (reward,) = r.rewards
    policy = r.policy.config
    assert (policy.model, policy.vae, policy.text_encoder) == (
        "hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2", "DeepFloyd/t5-v1_1-xxl")
    assert (policy.num_inference_steps, policy.guidance_scale) == (30, 7.0)
    assert reward.config.model == "TIGER-Lab/VideoScore-v1.1"
    assert r.selector.config.key == f"{reward.name}.temporal_consistency"
    assert r.objective.config.reference_update_every == 200 and r.spec.train.candidates_per_prompt == 4
    t = r.spec.train
    assert t.learning_rate == 1e-5 and t.prompts_per_step * t.gradient_accumulation_steps == 8


def test_vader_example_has_vaders_open_sora_settings():
    r = load("vader-opensora.yaml", ("vpo_opensora", "vpo_hpsv2", "vpo_vader"), "rollout")
    (reward,) = r.rewards
    policy = r.policy.config
    assert policy.model == "hpcai-tech/OpenSora-STDiT-v3" and policy.num_frames == 51
    assert (policy.num_inference_steps, policy.guidance_scale, policy.aesthetic_score) == (30, 7.0, 6.5)
    assert (policy.lora.rank, sorted(policy.lora.target_modules)) == (16, ["kv_linear", "q_linear", "qkv"])
    assert reward.part_type.name == "hpsv2" and list(r.objective.config.rewards) == [f"{reward.name}.score"]
    assert (r.objective.config.cutoff, r.objective.config.frames) == ("last", "one_random")
    t = r.spec.train
    assert (t.learning_rate, t.prompts_per_step, t.gradient_accumulation_steps) == (2e-4, 1, 8)
