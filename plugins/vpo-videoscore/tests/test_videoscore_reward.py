"""VideoScore reward on tiny random checkpoints written in the published formats and loaded by the plugin's loader."""

from __future__ import annotations

import json
import math
from importlib.metadata import entry_points

import numpy as np

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Idefics2Config, PreTrainedTokenizerFast, Qwen2VLConfig
from vpo_core import BuildContext

from vpo_videoscore import DIMENSIONS, CheckpointError, VideoScoreConfig, build
from vpo_videoscore.common import REGRESSION_QUERY_PROMPT
from vpo_videoscore.idefics2 import Idefics2ForSequenceClassification, build_prompt
from vpo_videoscore.qwen2_vl import Qwen2VLForSequenceClassification

CTX = BuildContext(device=torch.device("cpu"), seed=0)
PROMPTS = ["a cat playing piano", "two dogs run on the beach at sunset, slow motion", "rain"]


def tiny_tokenizer(specials: list[str], bos: str | None, pad: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens) trained on the query text, with the checkpoint's special tokens."""
    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([REGRESSION_QUERY_PROMPT, *PROMPTS], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, pad_token=pad, unk_token=specials[0])


# ------------------------------------------------------------------------------------------ Idefics2 checkpoint
IDEFICS2_SIZE = {"shortest_edge": 28, "longest_edge": 56}  # the published one has 378 / 980


def write_idefics2_checkpoint(directory, latents: int = 4):
    tokenizer = tiny_tokenizer(
        ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"], "<s>", "<unk>"
    )
    config = Idefics2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        perceiver_config=dict(hidden_act="silu", hidden_size=32, rms_norm_eps=1e-5, resampler_n_latents=latents,
                              resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_labels=5,
    )
    torch.manual_seed(0)
    model = Idefics2ForSequenceClassification(config)
    with torch.no_grad():  # a visible spread between outputs
        model.score.bias.copy_(torch.tensor([2.0, 2.5, 3.0, 1.5, 1.0]))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # The processor files of the published checkpoint (only the sizes differ).
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_image_splitting": False, "do_normalize": True, "do_pad": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Idefics2ImageProcessor", "processor_class": "Idefics2Processor", "resample": 2,
        "rescale_factor": 1 / 255, "size": IDEFICS2_SIZE,
    }))
    (directory / "processor_config.json").write_text(
        json.dumps({"image_seq_len": latents, "processor_class": "Idefics2Processor"})
    )
    return directory


@pytest.fixture(scope="module")
def idefics2_dir(tmp_path_factory):
    return write_idefics2_checkpoint(tmp_path_factory.mktemp("videoscore-v1.1"))


@pytest.fixture(scope="module")
def reward(idefics2_dir):
    return build(VideoScoreConfig(model=str(idefics2_dir), num_frames=4, micro_batch_size=2), CTX)


def frames_uint8(batch, t, h, w, seed=0):
    """Frames on the 1/255 grid, so the PIL-based reference processor sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, t, 3, h, w), generator=g).float() / 255


def idefics2_processor(directory):
    from transformers.models.idefics2 import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
    from transformers import AutoTokenizer

    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=False, size=IDEFICS2_SIZE, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2
    )
    return Idefics2Processor(image_processor, AutoTokenizer.from_pretrained(directory), image_seq_len=4)


def to_pil(frame):
    from PIL import Image  # the reference path only; the plugin never uses PIL

    return Image.fromarray((frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def processor_inputs(processor, frames_one, prompt):
    images = [to_pil(f) for f in frames_one]
    return processor(text=build_prompt(prompt, len(images)), images=images, return_tensors="pt")


def test_entry_point_registers_videoscore():
    (ep,) = [ep for ep in entry_points(group="vpo") if ep.name == "videoscore"]
    registered = {}
    module = ep.load()
    module.vpo_register_rewards(lambda name, factory, cfg: registered.update({name: (factory, cfg)}))
    assert registered == {"videoscore": (module.build_videoscore, VideoScoreConfig)}


def test_scores_all_dimensions(reward):
    assert reward.variant == "idefics2" and reward.dimensions == DIMENSIONS and reward.differentiable
    scores = reward.score(frames_uint8(3, 6, 28, 42), PROMPTS)
    assert set(scores) == set(DIMENSIONS)
    for value in scores.values():
        assert value.shape == (3,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    assert not torch.allclose(scores["visual_quality"], scores["dynamic_degree"])


def test_matches_transformers_processor_and_direct_forward(reward, idefics2_dir):
    """Plugin inputs equal Idefics2Processor's; scores equal the transformers model run on them one by one."""
    frames = frames_uint8(3, 4, 28, 42, seed=1)  # 28x42 needs no resize: processor and plugin see equal pixels
    processor = idefics2_processor(idefics2_dir)
    model = reward.scorer.model
    scores = reward.score(frames, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ref = processor_inputs(processor, frames[i], prompt)
        ids, mask = reward.scorer.text_inputs([prompt], 4, "cpu")
        assert ids.tolist() == ref["input_ids"].tolist()
        assert (ref["input_ids"] == model.config.image_token_id).sum() == 4 * 4
        pixels = reward.scorer.pixel_values(frames[i : i + 1])
        torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
        with torch.no_grad():
            hidden = model.model(
                input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=ref["pixel_values"],
                pixel_attention_mask=ref["pixel_attention_mask"], use_cache=False,
            ).last_hidden_state
            expected = model.score(hidden[0, -1])
        got = torch.stack([scores[d][i] for d in DIMENSIONS])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_resize_matches_processor(reward, idefics2_dir):
    frames = frames_uint8(1, 2, 64, 80, seed=2)  # longest edge 80 > 56 -> 44x56
    ref = processor_inputs(idefics2_processor(idefics2_dir), frames[0], PROMPTS[0])["pixel_values"]
    ours = reward.scorer.pixel_values(frames)
    assert ours.shape == ref.shape == (1, 2, 3, 44, 56)
    # PIL resizes uint8 images (rounding); torch keeps floats: differences stay within a couple of levels.
    assert (ours - ref).abs().max() < 3 * 2 / 255


def test_micro_batching_equals_single_batch(idefics2_dir, reward):
    frames = frames_uint8(3, 4, 28, 42, seed=3)
    one = build(VideoScoreConfig(model=str(idefics2_dir), num_frames=4, micro_batch_size=1), CTX)
    all_at_once = build(VideoScoreConfig(model=str(idefics2_dir), num_frames=4, micro_batch_size=8), CTX)
    a, b = one.score(frames, PROMPTS), all_at_once.score(frames, PROMPTS)
    for d in DIMENSIONS:
        torch.testing.assert_close(a[d], b[d], atol=1e-5, rtol=1e-5)


def test_dimension_selection_and_weights(idefics2_dir, reward):
    frames = frames_uint8(2, 4, 28, 42, seed=4)
    full = reward.score(frames, PROMPTS[:2])
    cfg = VideoScoreConfig(
        model=str(idefics2_dir), num_frames=4, dimensions=["temporal_consistency", "visual_quality"],
        weights={"temporal_consistency": 0.75, "visual_quality": 0.25},
    )
    part = build(cfg, CTX)
    assert part.dimensions == ("temporal_consistency", "visual_quality", "weighted")
    scores = part.score(frames, PROMPTS[:2])
    assert set(scores) == {"temporal_consistency", "visual_quality", "weighted"}
    torch.testing.assert_close(scores["temporal_consistency"], full["temporal_consistency"])
    expected = 0.75 * full["temporal_consistency"] + 0.25 * full["visual_quality"]
    torch.testing.assert_close(scores["weighted"], expected)


def test_differentiable_wrt_pixels(reward):
    frames = frames_uint8(2, 6, 32, 40, seed=5).requires_grad_(True)  # resized and frame-sampled
    scores = reward.score(frames, PROMPTS[:2])
    scores["temporal_consistency"].sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    # num_frames=4 of 6: frames 0, 1, 3, 4 are used, the others get no gradient
    used = frames.grad.abs().sum(dim=(0, 2, 3, 4)) > 0
    assert used.tolist() == [True, True, False, True, True, False]


def test_num_frames_default_and_tokens_per_frame_from_config(tmp_path):
    directory = write_idefics2_checkpoint(tmp_path / "VideoScore-v1.1", latents=2)
    reward = build(VideoScoreConfig(model=str(directory)), CTX)
    assert reward.num_frames == 48 and reward.scorer.image_seq_len == 2
    ids, _ = reward.scorer.text_inputs(["x"], 3, "cpu")
    assert (ids == reward.scorer.model.config.image_token_id).sum() == 3 * 2
    assert reward.score(frames_uint8(1, 3, 28, 28), ["x"])["visual_quality"].shape == (1,)


def test_config_errors_name_valid_dimensions():
    with pytest.raises(ValidationError, match="visual_quality, temporal_consistency"):
        VideoScoreConfig(dimensions=["sharpness"])
    with pytest.raises(ValidationError, match="weights must name selected dimensions"):
        VideoScoreConfig(dimensions=["visual_quality"], weights={"dynamic_degree": 1.0})
    with pytest.raises(ValidationError, match="Extra inputs"):
        VideoScoreConfig(frames=8)
    with pytest.raises(ValidationError, match="unknown VideoScore dimension"):
        VideoScoreConfig(dimensions="sharpness")
    assert VideoScoreConfig(dimensions="dynamic_degree").dimensions == ["dynamic_degree"]
    assert VideoScoreConfig(dimensions="all", weights={"dynamic_degree": 1.0}).weights == {"dynamic_degree": 1.0}


def test_checkpoint_errors(tmp_path, idefics2_dir):
    with pytest.raises(CheckpointError, match="does not exist"):
        build(VideoScoreConfig(model=str(tmp_path / "nope")), CTX)
    wrong = tmp_path / "generative"
    wrong.mkdir()
    config = json.loads((idefics2_dir / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "architectures": ["Idefics2ForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="not a VideoScore regression checkpoint"):
        build(VideoScoreConfig(model=str(wrong)), CTX)
    (wrong / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        build(VideoScoreConfig(model=str(wrong)), CTX)
    headless = tmp_path / "headless"
    headless.mkdir()
    for file in idefics2_dir.iterdir():
        (headless / file.name).write_bytes(file.read_bytes())
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="regression head"):
        build(VideoScoreConfig(model=str(headless)), CTX)
    with pytest.raises(CheckpointError, match="'qwen2vl' was set"):
        build(VideoScoreConfig(model=str(idefics2_dir), variant="qwen2vl"), CTX)


# ------------------------------------------------------------------------------------------ Qwen2-VL checkpoint
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny VideoScore-Qwen2-VL in the published (pre-transformers-5) layout: flat config, visual.*/model.*."""
    directory = tmp_path_factory.mktemp("videoscore-qwen2-vl")
    tokenizer = tiny_tokenizer(QWEN_SPECIALS, None, "<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    flat = {
        "architectures": ["Qwen2VLForSequenceClassification"], "model_type": "qwen2_vl",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "max_position_embeddings": 4096,
        "vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "id2label": {str(i): f"LABEL_{i}" for i in range(5)},
        "label2id": {f"LABEL_{i}": i for i in range(5)},
    }
    torch.manual_seed(0)
    model = Qwen2VLForSequenceClassification(Qwen2VLConfig(**json.loads(json.dumps(flat))))
    old_layout = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        old_layout[key] = value.contiguous()
    assert {k.split(".")[0] for k in old_layout} == {"visual", "model", "score"}
    save_file(old_layout, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(flat))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }))
    tokenizer.save_pretrained(directory)
    return directory


def qwen_reference(directory, frames, prompt, reward):
    """Independent forward: old-layout weights renamed by hand into a stock Qwen2VLModel, frames patchified by
    transformers' image processor (a pair of equal frames is one temporal patch of that frame), 1-D positions."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    weights = load_file(directory / "model.safetensors")
    config = Qwen2VLConfig(**json.loads((directory / "config.json").read_text()))
    model = Qwen2VLModel(config).eval()
    renamed = {  # visual.* stays, model.* (old decoder keys) -> language_model.*
        k if k.startswith("visual.") else "language_model." + k.removeprefix("model."): v
        for k, v in weights.items() if not k.startswith("score.")
    }
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not missing and not unexpected
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84)
    images = [(f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for f in frames[::2]]
    out = processor(images=images, return_tensors="pt")
    grid = out["image_grid_thw"]
    video_grid = torch.tensor([[len(images), int(grid[0, 1]), int(grid[0, 2])]])
    ids, mask = reward.scorer.text_inputs([prompt], int(video_grid.prod()) // 4, "cpu")
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, pixel_values_videos=out["pixel_values"],
                       video_grid_thw=video_grid, position_ids=torch.arange(ids.shape[1]).expand(3, 1, -1),
                       use_cache=False).last_hidden_state
    return hidden[0, -1] @ weights["score.weight"].T + weights["score.bias"]


def test_qwen2vl_old_layout_loads_and_matches_reference(qwen_dir):
    reward = build(VideoScoreConfig(model=str(qwen_dir), num_frames=4, micro_batch_size=2,
                                    min_pixels=56 * 56, max_pixels=56 * 84), CTX)
    assert reward.variant == "qwen2vl"
    base = frames_uint8(2, 2, 56, 56, seed=6)
    frames = base.repeat_interleave(2, dim=1)  # f0 f0 f1 f1: see qwen_reference
    scores = reward.score(frames, PROMPTS[:2])
    for i, prompt in enumerate(PROMPTS[:2]):
        expected = qwen_reference(qwen_dir, frames[i], prompt, reward)
        got = torch.stack([scores[d][i] for d in DIMENSIONS])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_qwen2vl_differentiable_and_batched(qwen_dir):
    kwargs = dict(model=str(qwen_dir), num_frames=3, min_pixels=56 * 56, max_pixels=56 * 84)
    one = build(VideoScoreConfig(**kwargs, micro_batch_size=1), CTX)
    many = build(VideoScoreConfig(**kwargs, micro_batch_size=4), CTX)
    frames = frames_uint8(2, 5, 40, 70, seed=7).requires_grad_(True)  # resized, odd frame count padded
    a = one.score(frames, PROMPTS[1:])
    b = many.score(frames, PROMPTS[1:])
    for d in DIMENSIONS:
        torch.testing.assert_close(a[d], b[d], atol=1e-5, rtol=1e-5)
    a["factual_consistency"].sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="cannot fetch config.json of VideoScore checkpoint 'TIGER-Lab/VideoS"):
        build(VideoScoreConfig(model="TIGER-Lab/VideoScore-v1.1"), CTX)


def test_uniform_gray_frames_are_scored(reward):
    # normalized to exactly 0, which transformers would otherwise take for batch-padding images and drop
    scores = reward.score(torch.full((1, 4, 3, 28, 28), 0.5), PROMPTS[:1])
    assert torch.isfinite(scores["visual_quality"]).all()


# ------------------------------------------------------------------------------------------ frame sampling
def release_idefics2_indices(total, max_num_frames):
    """examples/run_videoscore.py (TIGER-AI-Lab/VideoScore), transcribed."""
    if total > max_num_frames:
        return np.arange(0, total, total / max_num_frames).astype(int).tolist()
    return np.arange(total).tolist()


def release_qwen_nframes(total, video_fps, fps=8.0):
    """qwen_vl_utils 0.0.8 smart_nframes with {"fps": 8.0} (VideoScore's Qwen2-VL example), transcribed."""
    def round_by_factor(number, factor):
        return round(number / factor) * factor

    def ceil_by_factor(number, factor):
        return math.ceil(number / factor) * factor

    def floor_by_factor(number, factor):
        return math.floor(number / factor) * factor

    min_frames = ceil_by_factor(4, 2)
    max_frames = floor_by_factor(min(768, total), 2)
    nframes = total / video_fps * fps
    nframes = min(max(nframes, min_frames), max_frames)
    nframes = round_by_factor(nframes, 2)
    if not (2 <= nframes <= total):
        raise ValueError(f"nframes should in interval [2, {total}], but got {nframes}.")
    return nframes


def release_qwen_indices(total, video_fps):
    return torch.linspace(0, total - 1, release_qwen_nframes(total, video_fps)).round().long().tolist()


@pytest.mark.parametrize("video_fps", [8.0, 24.0, 30.0, 4.0, 12.5, 16.0])
@pytest.mark.parametrize("total", [2, 3, 5, 9, 16, 17, 33, 49, 97, 121, 400, 2000])
def test_qwen2vl_samples_frames_at_8_fps_as_the_release(total, video_fps):
    from vpo_videoscore.qwen2_vl import frame_indices

    assert frame_indices(total, video_fps) == release_qwen_indices(total, video_fps)


def test_qwen2vl_frame_counts_and_edge_cases():
    from vpo_videoscore.qwen2_vl import frame_indices

    assert len(frame_indices(49, 8.0)) == 48  # CogVideoX's 49 frames at 8 fps: 48 frames, not 16
    assert frame_indices(49, 24.0) == [0, 3, 6, 10, 13, 16, 19, 22, 26, 29, 32, 35, 38, 42, 45, 48]
    assert len(frame_indices(2000, 8.0)) == 768  # the release's cap
    assert frame_indices(1, 8.0) == [0]  # the release refuses a 1-frame clip; it is fed whole
    # an explicit count takes the release's "nframes" path: rounded to even, linspace
    assert frame_indices(9, 8.0, num_frames=4) == torch.linspace(0, 8, 4).round().long().tolist()
    assert frame_indices(9, 8.0, num_frames=5) == frame_indices(9, 8.0, num_frames=4)  # round(2.5) = 2 -> 4
    assert frame_indices(5, 8.0, num_frames=40) == [0, 1, 3, 4]  # more than exist: as many (even) as exist


@pytest.mark.parametrize("max_frames", [16, 48, 7])
def test_idefics2_samples_frames_as_the_release(max_frames):
    from vpo_videoscore.idefics2 import frame_indices

    for total in range(1, 500):
        assert frame_indices(total, max_frames) == release_idefics2_indices(total, max_frames), total
    assert frame_indices(208, 48)[27] == 116  # numpy's float steps, not floor(27 * 208 / 48) = 117


def test_default_frames_per_variant(qwen_dir, tmp_path):
    v1_dir = write_idefics2_checkpoint(tmp_path / "VideoScore", latents=2)
    assert build(VideoScoreConfig(model=str(v1_dir)), CTX).frame_indices(49) == release_idefics2_indices(49, 16)
    v11_dir = write_idefics2_checkpoint(tmp_path / "VideoScore-v1.1", latents=2)
    assert build(VideoScoreConfig(model=str(v11_dir)), CTX).frame_indices(97) == release_idefics2_indices(97, 48)
    qwen = build(VideoScoreConfig(model=str(qwen_dir)), CTX)
    assert qwen.num_frames is None and qwen.frame_indices(49) == release_qwen_indices(49, 8.0)
    qwen24 = build(VideoScoreConfig(model=str(qwen_dir), video_fps=24), CTX)
    assert qwen24.frame_indices(49) == release_qwen_indices(49, 24.0)


def test_qwen2vl_scores_the_frames_the_release_would(qwen_dir):
    """Only the frames of the 8-fps rule reach the model (gradient) and they alone decide the scores."""
    reward = build(VideoScoreConfig(model=str(qwen_dir), video_fps=24, min_pixels=56 * 56, max_pixels=56 * 56), CTX)
    frames = frames_uint8(1, 9, 56, 56, seed=8).requires_grad_(True)
    expected = release_qwen_indices(9, 24.0)  # 9 / 24 * 8 = 3 -> at least 4 -> [0, 3, 5, 8]
    assert expected == [0, 3, 5, 8]
    scores = reward.score(frames, PROMPTS[:1])
    scores["visual_quality"].sum().backward()
    used = (frames.grad.abs().sum(dim=(0, 2, 3, 4)) > 0).nonzero().flatten().tolist()
    assert used == expected
    picked = reward.score(frames.detach()[:, expected], PROMPTS[:1])  # 4 frames at 8 fps: all of them kept
    assert reward.frame_indices(4) == [0, 1, 2, 3]
    torch.testing.assert_close(picked["visual_quality"], scores["visual_quality"].detach())
