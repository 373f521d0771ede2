"""Reading VideoDPO's released pair layout: tiny mp4 clips + metadata.json + pair.json made here."""

from __future__ import annotations

import json
import re
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


def files_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")}


def test_alpha_null_gives_unit_weights_and_the_user_cache(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = files_under(layout)
    data = VideoDPOPairDataset(layout, toy_policy(frames=2, size=4), stride=2)
    assert data.batch([0]).weights.tolist() == [1.0]
    # no run directory known: the user's cache directory; the data set is left as it was (was DATA/.vpo-latents)
    assert data.cache.parent == tmp_path / "xdg" / "vpo" / "videodpo-latents"
    assert files_under(layout) == before


def test_latent_cache_is_never_written_into_the_data_set(layout, tmp_path):
    before = files_under(layout)
    context = BuildContext(torch.device("cpu"), 0, output_dir=tmp_path / "run")
    data = VideoDPOObjective(VideoDPOConfig(), context).open_pair_dataset(str(layout), "videodpo", toy_policy())
    data.batch([0, 1])
    assert data.cache.parent == tmp_path / "run" / "videodpo-latents"
    assert len(list(data.cache.glob("*.safetensors"))) == 4
    assert files_under(layout) == before
    for inside in (layout / "cache", layout / "clips" / "latents"):
        with pytest.raises(SpecError, match="inside the input data set"):
            VideoDPOPairDataset(layout, toy_policy(), cache_dir=inside)
    with pytest.raises(SpecError, match="inside the input data set"):  # a run directory inside the data set
        VideoDPOPairDataset(layout, toy_policy(), output_dir=layout / "runs" / "r1")
    assert files_under(layout) == before


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
    # the 2-frame clip is found when the data set is opened (it used to fail at the step that needed it)
    with pytest.raises(SpecError, match=r"1 clip\(s\) .*/metadata.json\[2\]: clip .*002.mp4' has 2 frames"):
        VideoDPOPairDataset(d, policy, cache_dir=tmp_path / "c", min_clip_duration=1.0)
    data = VideoDPOPairDataset(d, policy, cache_dir=tmp_path / "c", min_clip_duration=1.0, validate_clips=False)
    assert len(data) == 1 and data.dropped["short_clip"] == 1
    with pytest.raises(VpoError, match="has 2 frames"):
        data.batch([0])
    bad = json.loads((d / "pair.json").read_text()) + [{"video1": 0, "video2": 7, "frame_caption": "z"}]
    (d / "pair.json").write_text(json.dumps(bad))
    with pytest.raises(SpecError, match=r"pair.json\[2\]: video2 = 7 is outside .*metadata.json"):
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
objective: {{type: videodpo_dpo, beta: 50, alpha: 1.0}}
data: {{pairs: {layout}, pairs_format: videodpo}}
train: {{steps: 3, pairs_per_step: 1, gradient_accumulation_steps: 2, learning_rate: 0.01}}
eval: {{videos: 0, seeds_per_prompt: 1}}
checkpoint: {{every: 0}}
logging: {{trackers: []}}
""")
    before = files_under(layout)
    result = Trainer(load_spec(spec, pm), progress=False).run()
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert len(trained) == 3 and all(r["skipped"] == 0 for r in trained)
    assert trained[-1]["loss"] != trained[0]["loss"]
    # the latents are cached in the run's directory (BuildContext.output_dir), not in the data set
    assert len(list((tmp_path / "run" / "videodpo-latents").glob("*/*.safetensors"))) == 4
    assert files_under(layout) == before


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


# ----------------------------------------------------------------------------------------------- data checks
def test_duplicate_and_self_pairs_are_dropped_and_reported(tmp_path, capsys):
    pairs = [{"video1": 0, "video2": 1, "frame_caption": "x"},
             {"video1": 0, "video2": 1, "frame_caption": "x"},   # repeats [0]
             {"video1": 2, "video2": 2, "frame_caption": "x"},   # self-pair
             {"video1": 1, "video2": 3, "frame_caption": "x"},   # 3 names clip 1's file: self-pair too
             {"video1": 0, "video2": 1, "frame_caption": "y"},   # another prompt: kept
             {"video1": 1, "video2": 0, "frame_caption": "x"},   # the other order: kept
             {"video1": 0, "video2": 1, "frame_caption": "x"}]   # repeats [0] again
    d = make_layout(tmp_path / "d", [16, 16, 16], pairs)
    metadata = json.loads((d / "metadata.json").read_text())
    metadata.append({"basic": {"clip_path": "clips/../clips/001.mp4"}, "misc": {"frame_caption": ["dup"]}})
    (d / "metadata.json").write_text(json.dumps(metadata))
    data = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
    assert [(p.winner, p.loser, p.prompt) for p in data.pairs] == [(0, 1, "x"), (0, 1, "y"), (1, 0, "x")]
    assert data.dropped == {"self_pair": 2, "duplicate": 2, "short_clip": 0, "nonpositive_score": 0}
    err = capsys.readouterr().err
    assert "kept 3, dropped 2 self-pairs" in err and "pair.json[2]" in err
    assert "2 repeated pairs" in err and "pair.json[1] repeats " in err
    kept = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c", drop_duplicate_pairs=False)
    assert len(kept) == 5 and kept.dropped["self_pair"] == 2 and kept.dropped["duplicate"] == 0


def test_pairs_with_a_score_at_or_below_zero_are_dropped_under_reweighting(tmp_path, capsys):
    pairs = [{"video1": 0, "video2": 1, "frame_caption": "x", "score": 0.0},
             {"video1": 1, "video2": 0, "frame_caption": "x", "score": -0.1},
             {"video1": 0, "video2": 1, "frame_caption": "y", "score": 0.01},
             {"video1": 0, "video2": 1, "frame_caption": "z", "score": 0.36}]
    d = make_layout(tmp_path / "d", [16, 16], pairs)
    data = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c", alpha=1.0)
    assert [p.weight for p in data.pairs] == pytest.approx([10.0, 2.0])  # 72 capped at 10; 0.72 / 0.36
    assert data.dropped["nonpositive_score"] == 2 and "2 pairs whose score is <= 0" in capsys.readouterr().err
    assert len(VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c", alpha=0.0)) == 4
    assert len(VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")) == 4


def test_clip_paths_outside_the_data_set_are_refused(tmp_path):
    make_clip(tmp_path / "elsewhere" / "far.mp4", 16, seed=3)
    d = make_layout(tmp_path / "d", [16, 16], [{"video1": 0, "video2": 1, "frame_caption": "x"},
                                               {"video1": 0, "video2": 2, "frame_caption": "y"}])
    metadata = json.loads((d / "metadata.json").read_text())
    inside_absolute = {"basic": {"clip_path": str(d / "clips" / "001.mp4")}}
    for clip_path in ("../elsewhere/far.mp4", str(tmp_path / "elsewhere" / "far.mp4"), "clips/../../elsewhere/far.mp4"):
        (d / "metadata.json").write_text(json.dumps(metadata + [{"basic": {"clip_path": clip_path}}]))
        with pytest.raises(SpecError, match=r"1 clip_path entry point outside the data set directory .*"
                                            r"metadata.json\[2\]: '" + re.escape(clip_path) + "'.*allow_outside_paths"):
            VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
        data = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c", allow_outside_paths=True)
        assert data.clips[2].path == (tmp_path / "elsewhere" / "far.mp4") and len(data) == 2
    # an absolute path inside the data set, and ".." that stays inside, are fine
    inside_dotdot = {"basic": {"clip_path": "x/../clips/000.mp4"}}
    (d / "metadata.json").write_text(json.dumps(metadata + [inside_absolute, inside_dotdot]))
    assert len(VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")) == 2


def test_undecodable_clip_is_found_when_the_data_set_opens(tmp_path):
    d = make_layout(tmp_path / "d", [16, 16, 16], [{"video1": 0, "video2": 1, "frame_caption": "x"},
                                                   {"video1": 2, "video2": 1, "frame_caption": "y"}])
    data = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
    data.batch([0])  # clips 0 and 1 are now cached
    (d / "clips" / "002.mp4").write_bytes(b"\x00\x00\x00 not a video")
    (d / "clips" / "000.mp4").write_bytes(b"")  # cached: its latents are used, it is not decoded again
    with pytest.raises(SpecError, match=r"1 clip\(s\) .*/metadata.json\[2\]: cannot decode clip .*002.mp4"):
        VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
    # with the check off, the broken clip is met at the step that needs it
    late = VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c", validate_clips=False)
    late.batch([0])
    with pytest.raises(VpoError, match="cannot decode clip"):
        late.batch([1])


@pytest.mark.parametrize(("file", "content", "message"), [
    ("pair.json", "", r"pair.json' as JSON"),
    ("pair.json", "{}", r"pair.json' must hold a JSON list .* got dict"),
    ("pair.json", "[]", r"pair.json' is an empty list"),
    ("metadata.json", "[]", r"metadata.json' is an empty list"),
    ("metadata.json", '[{"misc": {}}]', r"metadata.json\[0\]: no basic.clip_path string"),
    ("metadata.json", '[{"basic": {"clip_path": 3}}]', r"metadata.json\[0\]: no basic.clip_path"),
    ("metadata.json", '[{"basic": {"clip_path": "clips/000.mp4", "clip_duration": "2s"}}]',
     r"metadata.json\[0\]: basic.clip_duration must be seconds"),
    ("pair.json", '[{"video1": 0, "video2": 1}, 7]', r"pair.json\[1\]: not an object"),
    ("pair.json", '[{"video1": 0}]', r"pair.json\[0\]: 'video2' must be an integer"),
    ("pair.json", '[{"video1": 0.0, "video2": 1}]', r"pair.json\[0\]: 'video1' must be an integer"),
    ("pair.json", '[{"video1": "0", "video2": 1}]', r"pair.json\[0\]: 'video1' must be an integer"),
    ("pair.json", '[{"video1": true, "video2": 0}]', r"pair.json\[0\]: 'video1' must be an integer"),
    ("pair.json", '[{"video1": -1, "video2": 0}]', r"pair.json\[0\]: video1 = -1 is outside"),
    ("pair.json", '[{"video1": 0, "video2": 1}, {"video1": 2, "video2": 0}]', r"pair.json\[1\]: video1 = 2 is outside"),
    ("pair.json", '[{"video1": 0, "video2": 1, "score": "high"}]', r"pair.json\[0\]: 'score' must be a number"),
    ("pair.json", '[{"video1": 0, "video2": 1, "frame_caption": 5}]', r"pair.json\[0\]: 'frame_caption' must be"),
])
def test_malformed_json_names_the_file_and_entry(tmp_path, file, content, message):
    d = make_layout(tmp_path / "d", [16, 16], [{"video1": 0, "video2": 1, "frame_caption": "x"}])
    (d / file).write_text(content)
    with pytest.raises(SpecError, match=message) as err:
        VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
    assert err.value.exit_code == 2 and str(d / file) in str(err.value)


def test_a_pair_without_any_prompt_is_refused(tmp_path):
    d = make_layout(tmp_path / "d", [16, 16], [{"video1": 0, "video2": 1}])
    metadata = json.loads((d / "metadata.json").read_text())
    del metadata[0]["misc"]
    (d / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(SpecError, match=r"pair.json\[0\]: no prompt.*metadata.json\[0\]"):
        VideoDPOPairDataset(d, toy_policy(), cache_dir=tmp_path / "c")
