"""Reading VideoDPO's released pair layout: tiny mp4 clips + metadata.json + pair.json made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import vpo_core.testing
import vpo_videodpo.plugin
from vpo_core import BuildContext, SpecError, StepContext, VpoError
from vpo_core.loop import Trainer
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.video import read_video, write_video
from vpo_videodpo import VideoDPOConfig, VideoDPOObjective, VideoDPOPairDataset

torch.set_num_threads(1)


def make_clip(path: Path, frames: int, seed: int, size: int = 16) -> Path:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g)
    drift = torch.linspace(0, 1, frames).view(-1, 1, 1, 1) * torch.rand(1, 3, 1, 1, generator=g)
    return write_video(path, (0.2 + 0.6 * base * (1 - 0.5 * drift)).clamp(0, 1), fps=8)


def make_layout(directory: Path, clip_frames: list[int], pairs: list[dict], durations=None, seed=0) -> Path:
    metadata = []
    for i, n in enumerate(clip_frames):
        make_clip(directory / "clips" / f"{i:03d}.mp4", n, seed + i)
        metadata.append({"basic": {"clip_path": f"clips/{i:03d}.mp4",
                                   "clip_duration": (durations or {}).get(i, 2.0), "globalidx": i},
                         "misc": {"frame_caption": [f"prompt of clip {i}"]}})
    (directory / "metadata.json").write_text(json.dumps(metadata))
    (directory / "pair.json").write_text(json.dumps(pairs))
    return directory


PAIRS = [
    {"video1": 0, "video2": 1, "label": 0, "frame_caption": "a red ball", "score": 0.36, "diff_score": 0.3},
    {"video1": 3, "video2": 2, "label": 0, "frame_caption": ["a blue cube"]},
]


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return make_layout(tmp_path_factory.mktemp("videodpo") / "set", [16, 16, 8, 16], PAIRS)


def toy_policy(frames=4, size=8):
    return vpo_core.testing.ToyPolicy(vpo_core.testing.ToyPolicyConfig(frames=frames, size=size),
                                      BuildContext(torch.device("cpu"), 0))


def expected_latents(policy, clip: Path, frames: int, stride: int, size: int) -> torch.Tensor:
    video = read_video(clip, num_frames=frames, stride=stride)
    video = F.interpolate(video, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return policy.encode(video.clamp(0, 1)[None])[0]


def test_read_encode_and_cache(layout, tmp_path):
    policy = toy_policy()
    data = VideoDPOPairDataset(layout, policy, cache_dir=tmp_path / "cache", alpha=1.0)
    assert len(data) == 2 and (data.frames, data.height, data.width) == (4, 8, 8)  # the policy's geometry
    batch = data.batch([0, 1])
    assert batch.winner_latents.shape == (2, 4, 3, 8, 8)
    assert batch.prompts == ["a red ball", "a blue cube"]
    assert batch.weights.tolist() == pytest.approx([2.0, 1.0])  # 0.72 / 0.36; no score -> 1
    assert batch.margins.tolist() == pytest.approx([0.3, 0.0])
    clips = layout / "clips"
    assert torch.allclose(batch.winner_latents[0], expected_latents(policy, clips / "000.mp4", 4, 4, 8))
    assert torch.allclose(batch.loser_latents[0], expected_latents(policy, clips / "001.mp4", 4, 4, 8))
    assert torch.allclose(batch.winner_latents[1], expected_latents(policy, clips / "003.mp4", 4, 4, 8))
    # clip 2 has 8 frames: too short for 4 frames at stride 4, so it is read at stride 1 (as VideoDPO does)
    assert torch.allclose(batch.loser_latents[1], expected_latents(policy, clips / "002.mp4", 4, 1, 8))
    cached = list(next((tmp_path / "cache").iterdir()).glob("*.safetensors"))
    assert len(cached) == 4
    # each clip is encoded once: a second read never calls the VAE
    policy.encode = lambda frames: (_ for _ in ()).throw(AssertionError("encoded twice"))
    again = VideoDPOPairDataset(layout, policy, cache_dir=tmp_path / "cache", alpha=1.0).batch([1, 0])
    assert torch.equal(again.winner_latents[1], batch.winner_latents[0])
    # other clip settings use another cache directory
    VideoDPOPairDataset(layout, toy_policy(), cache_dir=tmp_path / "cache", frames=2).batch([0])
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_alpha_null_gives_unit_weights_and_default_cache(layout):
    data = VideoDPOPairDataset(layout, toy_policy(frames=2, size=4), stride=2)
    assert data.batch([0]).weights.tolist() == [1.0]
    assert data.cache.parent == layout / ".vpo-latents"


def test_several_directories_keep_their_own_indices(tmp_path):
    root = tmp_path / "root"
    make_layout(root / "a", [16, 16], [{"video1": 1, "video2": 0, "label": 0, "frame_caption": "a"}], seed=0)
    make_layout(root / "b", [16, 16], [{"video1": 0, "video2": 1, "label": 0, "frame_caption": "b"}], seed=10)
    policy = toy_policy()
    data = VideoDPOPairDataset(root, policy, cache_dir=tmp_path / "cache")
    assert len(data) == 2
    batch = data.batch([1])
    assert batch.prompts == ["b"]
    assert torch.allclose(batch.winner_latents[0], expected_latents(policy, root / "b" / "clips" / "000.mp4", 4, 4, 8))


def test_short_clips_and_user_mistakes(tmp_path):
    d = make_layout(tmp_path / "d", [16, 16, 2], [{"video1": 0, "video2": 1, "label": 0, "frame_caption": "x"},
                                                  {"video1": 0, "video2": 2, "label": 0, "frame_caption": "y"}],
                    durations={1: 0.5})
    policy = toy_policy()
    data = VideoDPOPairDataset(d, policy, cache_dir=tmp_path / "c", min_clip_duration=1.0)
    assert len(data) == 1 and data.dropped_short == 1
    with pytest.raises(VpoError, match="has 2 frames"):
        data.batch([0])
    bad = json.loads((d / "pair.json").read_text()) + [{"video1": 0, "video2": 7, "frame_caption": "z"}]
    (d / "pair.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError, match="outside metadata.json"):
        VideoDPOPairDataset(d, policy, cache_dir=tmp_path / "c")
    (d / "clips" / "000.mp4").unlink()
    with pytest.raises(SpecError, match="do not exist"):
        VideoDPOPairDataset(d, policy, cache_dir=tmp_path / "c")
    with pytest.raises(SpecError, match="no pair.json"):
        VideoDPOPairDataset(tmp_path / "c", policy)
    with pytest.raises(SpecError, match="pairs_format"):
        VideoDPOObjective(VideoDPOConfig()).open_pair_dataset(str(d), "parquet", policy)


def test_train_on_the_released_layout(layout, tmp_path):
    pm = PluginManager(load_entrypoints=False)
    pm.register_plugin(vpo_core.testing, "toy")
    pm.register_plugin(vpo_videodpo.plugin, "videodpo")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
output_dir: {tmp_path / 'run'}
policy: {{type: toy, frames: 4, size: 8}}
rewards: [{{type: toy_brightness}}]
objective: {{type: videodpo_dpo, beta: 50, alpha: 1.0, cache_dir: {tmp_path / 'cache'}}}
data: {{pairs: {layout}, pairs_format: videodpo}}
train: {{steps: 3, pairs_per_step: 1, gradient_accumulation_steps: 2, learning_rate: 0.01}}
eval: {{videos: 0, seeds_per_prompt: 1}}
checkpoint: {{every: 0}}
logging: {{trackers: []}}
""")
    result = Trainer(load_spec(spec, pm), progress=False).run()
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert len(trained) == 3 and all(r["skipped"] == 0 for r in trained)
    assert trained[-1]["loss"] != trained[0]["loss"]


def test_tiny_cogvideox_encodes_clips_and_trains(tmp_path):
    cogvideox = pytest.importorskip("vpo_cogvideox")
    model = cogvideox.build_tiny_cogvideox(tmp_path / "tiny", seed=0)
    config = cogvideox.CogVideoXConfig(model=str(model), num_frames=9, height=32, width=32, num_inference_steps=2)
    policy = cogvideox.build(config, BuildContext(device=torch.device("cpu"), seed=0))
    layout = make_layout(tmp_path / "set", [40, 12], [{"video1": 0, "video2": 1, "label": 0, "frame_caption": "a cat"}])
    data = VideoDPOObjective(VideoDPOConfig(cache_dir=str(tmp_path / "cache"))).open_pair_dataset(
        str(layout), "videodpo", policy)
    assert (data.frames, data.height, data.width) == (9, 32, 32)
    batch = data.batch([0])
    assert batch.winner_latents.shape == (1, 3, 4, 8, 8)  # [B, F, C, H, W]: 9 frames -> 3 latent frames
    # the cached latents are the VAE's: decoding gives back a 9-frame 32x32 video
    assert policy.decode(batch.winner_latents).shape == (1, 9, 3, 32, 32)
    objective = VideoDPOObjective(VideoDPOConfig(beta=100.0))
    out = objective.loss(policy, batch, StepContext(step=1, generator=torch.Generator().manual_seed(0), score=None))
    out.loss.backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)
    assert out.metrics["pairs"] == 1.0
