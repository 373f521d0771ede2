"""examples/vader-videocrafter2.yaml and examples/videodpo-videocrafter2.yaml are valid specs with VADER's and
VideoDPO's VideoCrafter2 settings, naming the real checkpoint."""

from __future__ import annotations

from pathlib import Path

from vpo_core.testing import validated_example

ROOT = Path(__file__).resolve().parents[3]


def load(name, plugins, mode):
    return validated_example(ROOT / "examples" / name, mode, needs=plugins)


def test_vader_example_has_vaders_videocrafter2_settings():
    r = load("vader-videocrafter2.yaml", ("vpo_videocrafter2", "vpo_hpsv2", "vpo_vader"),
             "rollout")
    (reward,) = r.rewards
    policy = r.policy.config
    assert (policy.model, policy.tokenizer) == ("VideoCrafter/VideoCrafter2", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert (policy.num_inference_steps, policy.eta, policy.guidance_scale, policy.fps) == (25, 1.0, 12.0, 24)
    assert (policy.num_frames, policy.height, policy.width) == (12, 320, 512)
    lora = policy.lora
    assert (lora.rank, lora.alpha, lora.dropout, sorted(lora.target_modules)) == (16, 8, 0.01, ["to_k", "to_q", "to_v"])
    assert not policy.full_finetune
    assert reward.part_type.name == "hpsv2" and reward.config.version == "v2.1"
    assert list(r.objective.config.rewards) == [f"{reward.name}.score"]
    assert (r.objective.config.cutoff, r.objective.config.frames) == ("last", "one_random")
    t = r.spec.train
    assert (t.learning_rate, t.prompts_per_step, t.gradient_accumulation_steps, t.steps) == (2e-4, 1, 8, 450)


def test_videodpo_example_has_the_released_training_setting():
    r = load("videodpo-videocrafter2.yaml", ("vpo_videocrafter2", "vpo_videodpo"), "offline pairs")
    policy, objective, t = r.policy.config, r.objective.config, r.spec.train
    assert policy.model == "VideoCrafter/VideoCrafter2" and policy.full_finetune
    assert (policy.num_frames, policy.height, policy.width, policy.guidance_scale) == (16, 320, 512, 12.0)
    assert (objective.beta, objective.clip_frames, objective.clip_stride) == (5000, 16, 4)
    assert (objective.clip_height, objective.clip_width) == (320, 512)
    assert (r.spec.data.pairs_format, t.learning_rate) == ("videodpo", 6e-6)
    assert t.pairs_per_step * t.gradient_accumulation_steps == 8  # 1 pair per GPU x 4 GPUs x accumulation 2
