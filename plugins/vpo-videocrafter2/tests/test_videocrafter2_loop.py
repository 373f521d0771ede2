"""A tiny VideoCrafter2 spec through the real training loop: VideoDPO (full fine-tuning on pairs in VideoDPO's
released layout), VADER (reward gradient through the last DDIM step, one decoded frame) and OnlineVPO (online
best-vs-worst pairs with a curriculum reference), each for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import vpo_core.testing
from safetensors.torch import load_file
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import ONLINE_DPO, REWARD_GRADIENT, policy_loop_spec, trained_rows
from vpo_core.video import write_video

import vpo_videocrafter2.plugin
from vpo_videocrafter2.checkpoint import UNET
from vpo_videocrafter2.testing import build_tiny_videocrafter2

onlinevpo = pytest.importorskip("vpo_onlinevpo.plugin")
vader = pytest.importorskip("vpo_vader.plugin")
videodpo = pytest.importorskip("vpo_videodpo.plugin")
torch.set_num_threads(1)

POLICY = ("{{type: videocrafter2, model: {d}, tokenizer: {d}/tokenizer, num_frames: 4, height: 16, width: 16, "
          "num_inference_steps: 4, micro_batch_size: 3, lora: {{rank: 4, alpha: 4}}{extra}}}")
VIDEODPO = """\
objective: {type: videodpo_dpo, beta: 500}
train: {steps: 2, pairs_per_step: 2, learning_rate: 1.0e-4}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_videocrafter2(tmp_path_factory.mktemp("vc2") / "tiny")


@pytest.fixture
def pm():
    manager = PluginManager(load_entrypoints=False)
    for module, name in ((vpo_core.testing, "toy"), (onlinevpo, "onlinevpo"), (vader, "vader"),
                         (videodpo, "videodpo"), (vpo_videocrafter2.plugin, "videocrafter2")):
        manager.register_plugin(module, name)
    return manager


def run(tmp_path, pm, tiny, section, *overrides, extra=""):
    spec = tmp_path / "spec.yaml"
    spec.write_text(policy_loop_spec(tmp_path / "out", POLICY.format(d=tiny, extra=extra), 1, section))
    return Trainer(load_spec(spec, pm, list(overrides)), progress=False).run()


def released_layout(directory: Path) -> Path:
    """VideoDPO's released layout: clips (16 frames, read at stride 4 -> the policy's 4 frames), metadata.json and
    pair.json whose video1 is the winner."""
    metadata = []
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        frames = (torch.rand(1, 3, 16, 16, generator=g) * torch.linspace(0.4, 1, 16).view(-1, 1, 1, 1)).clamp(0, 1)
        write_video(directory / "clips" / f"{i:03d}.mp4", frames, fps=8)
        metadata.append({"basic": {"clip_path": f"clips/{i:03d}.mp4", "clip_duration": 2.0, "globalidx": i},
                         "misc": {"frame_caption": [f"prompt {i}"]}})
    pairs = [{"video1": 0, "video2": 1, "label": 0, "frame_caption": "a red ball bouncing", "score": 0.5},
             {"video1": 3, "video2": 2, "label": 0, "frame_caption": ["a blue cube"]}]
    (directory / "metadata.json").write_text(json.dumps(metadata))
    (directory / "pair.json").write_text(json.dumps(pairs))
    return directory


def test_videodpo_full_finetune_on_the_released_pair_layout(tmp_path, pm, tiny):
    layout = released_layout(tmp_path / "pairs")
    result = run(tmp_path, pm, tiny, VIDEODPO, f"data.pairs={layout}", "data.pairs_format=videodpo",
                 extra=", full_finetune: true")
    rows = trained_rows(result.output_dir)
    assert len(rows) == 2 and all(r["skipped"] == 0 and r["pairs"] == 2 for r in rows)
    assert all("objective/implicit_accuracy" in r for r in rows)
    saved = load_file(str(result.output_dir / "final" / "unet.safetensors"))
    original = {k: v for k, v in torch.load(tiny / "model.ckpt", weights_only=True)["state_dict"].items()
                if k.startswith(UNET)}
    assert saved.keys() == original.keys()  # VideoCrafter's own names
    assert any(not torch.equal(saved[k], original[k]) for k in saved)  # the DPO loss moved the UNet


def test_vader_reward_gradient_trains_the_lora(tmp_path, pm, tiny):
    result = run(tmp_path, pm, tiny, REWARD_GRADIENT)
    rows = trained_rows(result.output_dir)
    assert len(rows) == 3 and all(r["skipped"] == 0 for r in rows)
    assert all(r["objective/decoded_frames"] == 1 and r["objective/grad_steps"] == 1 for r in rows)
    state = load_file(str(result.output_dir / "checkpoints" / "step-000002" / "policy.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the reward gradient moved it
    assert (result.output_dir / "final" / "adapter_model.safetensors").is_file()


def test_onlinevpo_trains_with_a_curriculum_reference(tmp_path, pm, tiny):
    result = run(tmp_path, pm, tiny, ONLINE_DPO)
    rows = trained_rows(result.output_dir)
    assert len(rows) == 3 and all(r["skipped"] == 0 and r["pairs"] == 1 for r in rows)
    assert [r["objective/reference_updated"] for r in rows] == [0, 1, 0]
    step2 = load_file(str(result.output_dir / "checkpoints" / "step-000002" / "policy.safetensors"))
    learner = {k: v for k, v in step2.items() if ".default." in k}
    assert learner and all(torch.equal(v, step2[k.replace(".default.", ".reference.")]) for k, v in learner.items())
