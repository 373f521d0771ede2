"""HPSv2 reward on a tiny random checkpoint written in the original open_clip layout.

The reference below is an independent open_clip-style forward in plain torch on the *original* weights, so
the conversion (q/k/v split, transposed projections, renames) and the reward's pooling are checked against it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import BertConfig, CLIPTokenizer

from vpo_core import BuildContext, VpoError
from vpo_hpsv2.convert import main as convert_main
from vpo_hpsv2.reward import (
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, HPSv2Config, build_hpsv2_reward, resize_longest_side_and_pad,
)

VISION_WIDTH, VISION_LAYERS, VISION_HEADS, PATCH, IMAGE = 32, 2, 4, 4, 16
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, CONTEXT = 48, 2, 4, 16
EMBED = 24
PROMPTS = ["a red cat", "two dogs playing"]


# ----------------------------------------------------------------------------------------------- fixtures
def _block_weights(prefix: str, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=gen) * scale

    return {
        f"{prefix}ln_1.weight": 1 + rnd(width), f"{prefix}ln_1.bias": rnd(width),
        f"{prefix}attn.in_proj_weight": rnd(3 * width, width, scale=width**-0.5),
        f"{prefix}attn.in_proj_bias": rnd(3 * width),
        f"{prefix}attn.out_proj.weight": rnd(width, width, scale=width**-0.5),
        f"{prefix}attn.out_proj.bias": rnd(width),
        f"{prefix}ln_2.weight": 1 + rnd(width), f"{prefix}ln_2.bias": rnd(width),
        f"{prefix}mlp.c_fc.weight": rnd(4 * width, width, scale=width**-0.5), f"{prefix}mlp.c_fc.bias": rnd(4 * width),
        f"{prefix}mlp.c_proj.weight": rnd(width, 4 * width, scale=(4 * width) ** -0.5),
        f"{prefix}mlp.c_proj.bias": rnd(width),
    }


def tiny_open_clip_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with open_clip's CLIP key names and shapes (ViT image tower, causal text tower)."""
    gen = torch.Generator().manual_seed(seed)
    grid = IMAGE // PATCH
    sd = {
        "visual.conv1.weight": torch.randn(VISION_WIDTH, 3, PATCH, PATCH, generator=gen) * 0.1,
        "visual.class_embedding": torch.randn(VISION_WIDTH, generator=gen) * 0.1,
        "visual.positional_embedding": torch.randn(grid * grid + 1, VISION_WIDTH, generator=gen) * 0.1,
        "visual.ln_pre.weight": 1 + 0.1 * torch.randn(VISION_WIDTH, generator=gen),
        "visual.ln_pre.bias": 0.1 * torch.randn(VISION_WIDTH, generator=gen),
        "visual.ln_post.weight": 1 + 0.1 * torch.randn(VISION_WIDTH, generator=gen),
        "visual.ln_post.bias": 0.1 * torch.randn(VISION_WIDTH, generator=gen),
        "visual.proj": torch.randn(VISION_WIDTH, EMBED, generator=gen) * VISION_WIDTH**-0.5,
        "token_embedding.weight": torch.randn(vocab_size, TEXT_WIDTH, generator=gen) * 0.1,
        "positional_embedding": torch.randn(CONTEXT, TEXT_WIDTH, generator=gen) * 0.1,
        "ln_final.weight": 1 + 0.1 * torch.randn(TEXT_WIDTH, generator=gen),
        "ln_final.bias": 0.1 * torch.randn(TEXT_WIDTH, generator=gen),
        "text_projection": torch.randn(TEXT_WIDTH, EMBED, generator=gen) * TEXT_WIDTH**-0.5,
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    for i in range(VISION_LAYERS):
        sd |= _block_weights(f"visual.transformer.resblocks.{i}.", VISION_WIDTH, gen)
    for i in range(TEXT_LAYERS):
        sd |= _block_weights(f"transformer.resblocks.{i}.", TEXT_WIDTH, gen)
    return sd


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer over the 256 byte symbols (no merges); start/end of text get the highest ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab |= {symbol + "</w>": len(alphabet) + i for i, symbol in enumerate(alphabet)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    state_dict = tiny_open_clip_state_dict(vocab_size)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state_dict}, path)
    return path, state_dict


def make_reward(model: str, tokenizer_dir, **overrides):
    fields = dict(tokenizer=str(tokenizer_dir), vision_heads=VISION_HEADS, text_heads=TEXT_HEADS, num_frames="all")
    config = HPSv2Config(model=str(model), **(fields | overrides))
    return build_hpsv2_reward(config, BuildContext(device=torch.device("cpu"), seed=0))


def random_frames(batch=2, frames=3, size=IMAGE, seed=1):
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- reference
def _reference_blocks(x, sd, prefix, layers, heads, attn_mask=None):
    width = x.shape[-1]
    for i in range(layers):
        p = f"{prefix}{i}."
        y = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps=1e-5)
        y = y.transpose(0, 1)  # multi_head_attention_forward wants [L, N, E]
        attn, _ = F.multi_head_attention_forward(
            y, y, y, width, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
            0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=attn_mask,
        )
        x = x + attn.transpose(0, 1)
        y = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps=1e-5)
        x = x + F.linear(F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def reference_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(len(x), 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (VISION_WIDTH,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps=1e-5)
    x = _reference_blocks(x, sd, "visual.transformer.resblocks.", VISION_LAYERS, VISION_HEADS)
    x = F.layer_norm(x[:, 0], (VISION_WIDTH,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps=1e-5)
    return x @ sd["visual.proj"]


def reference_text_features(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    x = _reference_blocks(x, sd, "transformer.resblocks.", TEXT_LAYERS, TEXT_HEADS, attn_mask=causal)
    x = F.layer_norm(x, (TEXT_WIDTH,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ sd["text_projection"]  # open_clip's argmax pooling


def reference_score(sd, tokenizer, frames, prompts):
    """HPSv2 score of frames already at the model's size: mean over frames of cos(image, text)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    ids = tokenizer(prompts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids
    text = F.normalize(reference_text_features(sd, ids), dim=-1)
    batch, num_frames = frames.shape[:2]
    image = reference_image_features(sd, (frames.flatten(0, 1) - mean) / std)
    image = F.normalize(image, dim=-1).view(batch, num_frames, -1)
    return (image * text[:, None]).sum(-1).mean(1)


# ----------------------------------------------------------------------------------------------- tests
def test_score_matches_open_clip_reference_forward(checkpoint, tokenizer_dir):
    path, state_dict = checkpoint
    reward = make_reward(path, tokenizer_dir)
    frames = random_frames()
    scores = reward.score(frames, PROMPTS)
    assert set(scores) == {"score"} and scores["score"].shape == (2,)
    expected = reference_score(state_dict, CLIPTokenizer.from_pretrained(tokenizer_dir), frames, PROMPTS)
    torch.testing.assert_close(scores["score"], expected, atol=1e-5, rtol=1e-4)
    # Different prompts must give different scores (the text path is not ignored).
    swapped = reward.score(frames, PROMPTS[::-1])["score"]
    assert not torch.allclose(swapped, scores["score"])


def test_convert_command_round_trip(checkpoint, tokenizer_dir, tmp_path):
    path, _ = checkpoint
    out_dir = tmp_path / "hpsv2-hf"
    argv = [str(path), str(out_dir), "--tokenizer", str(tokenizer_dir), "--vision-heads", "4", "--text-heads", "4"]
    assert convert_main(argv) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()
    frames = random_frames(seed=3)
    direct = make_reward(path, tokenizer_dir).score(frames, PROMPTS)["score"]
    # The converted directory carries its own tokenizer: tokenizer=None must find it.
    config = HPSv2Config(model=str(out_dir), num_frames="all")
    converted = build_hpsv2_reward(config, BuildContext(device=torch.device("cpu"), seed=0))
    torch.testing.assert_close(converted.score(frames, PROMPTS)["score"], direct, atol=1e-6, rtol=1e-5)


def test_module_prefix_and_bare_state_dict_load(checkpoint, tokenizer_dir, tmp_path):
    path, state_dict = checkpoint
    prefixed = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, prefixed)
    bare = tmp_path / "bare.pt"
    torch.save(state_dict, bare)
    frames = random_frames(batch=1, frames=2)
    want = make_reward(path, tokenizer_dir).score(frames, PROMPTS[:1])["score"]
    for other in (prefixed, bare):
        torch.testing.assert_close(make_reward(other, tokenizer_dir).score(frames, PROMPTS[:1])["score"], want)


def test_differentiable_and_resizes_non_square_frames(checkpoint, tokenizer_dir):
    reward = make_reward(checkpoint[0], tokenizer_dir, num_frames=2)
    assert reward.differentiable
    frames = torch.rand(2, 5, 3, 20, 28, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    score = reward.score(frames, PROMPTS)["score"]
    score.sum().backward()
    assert frames.grad is not None and torch.isfinite(frames.grad).all()
    # Only the two uniformly sampled frames (0 and 4) receive gradient.
    touched = frames.grad.abs().flatten(2).sum(-1) > 0
    assert touched[:, [0, 4]].all() and not touched[:, 1:4].any()


def published_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize(size, fill=0)`` computed independently with PIL and numpy, one [3, H, W] image.

    Longest side -> ``size`` with the other side ``round(side * size / longest)`` (Python's round), bicubic;
    black padding split ``[pad // 2, pad - pad // 2]`` (left/top get the smaller half). PIL's float ("F") bicubic
    is the kernel torch's antialiased bicubic was written to reproduce (a = -0.5, support scaled when
    shrinking, weights renormalised at the borders); PIL accumulates in double, torch in float32.
    """
    height, width = image.shape[-2:]
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    channels = [np.asarray(Image.fromarray(c.numpy()).resize((new_w, new_h), Image.BICUBIC)) for c in image]
    resized = np.stack(channels)
    pad_h, pad_w = size - new_h, size - new_w
    padded = np.pad(resized, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
    return torch.from_numpy(padded)


# (height, width) -> shrink with an odd pad (20x28 -> 11x16, pad 2 top / 3 bottom), a tie that Python rounds to
# even (21x32 -> 10.5 -> 10), portrait, an upscale, a video-sized frame, and a square already at size.
TRANSFORM_CASES = [((20, 28), 16), ((21, 32), 16), ((31, 12), 16), ((6, 9), 16), ((320, 512), 224), ((16, 16), 16)]


@pytest.mark.parametrize(("shape", "size"), TRANSFORM_CASES)
def test_preprocessing_matches_hpsv2_resize_max_size(shape, size):
    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
    ours = resize_longest_side_and_pad(image[None], size)[0]
    expected = published_transform(image, size)
    assert ours.shape == expected.shape == (3, size, size)
    # The padding is exactly where HPSv2 puts it, and exactly black (0 before the CLIP normalisation).
    torch.testing.assert_close(ours == 0, expected == 0, rtol=0, atol=0)
    # Resize kernels agree up to float32-vs-double accumulation (measured max |diff| ~1e-5 at 320x512 -> 140x224).
    torch.testing.assert_close(ours, expected, rtol=0, atol=5e-5)


def test_preprocessing_pads_and_does_not_crop():
    """A wide frame keeps its whole width (centre-cropping would cut the red bars at both ends)."""
    image = torch.zeros(1, 3, 8, 32)
    image[..., 0, :, :4] = 1.0
    image[..., 0, :, -4:] = 1.0
    out = resize_longest_side_and_pad(image, 16)  # -> 4 x 16 content, 6 rows of black above and below
    assert out[0, 0, 6:10, :2].min() > 0.9 and out[0, 0, 6:10, -2:].min() > 0.9
    assert out[0, :, :6].abs().max() == 0 and out[0, :, 10:].abs().max() == 0


def test_score_of_non_square_frames_follows_published_transform(checkpoint, tokenizer_dir):
    path, state_dict = checkpoint
    frames = torch.rand(2, 2, 3, 20, 28, generator=torch.Generator().manual_seed(4))
    scores = make_reward(path, tokenizer_dir).score(frames, PROMPTS)["score"]
    padded = torch.stack([torch.stack([published_transform(f, IMAGE) for f in video]) for video in frames])
    expected = reference_score(state_dict, CLIPTokenizer.from_pretrained(tokenizer_dir), padded, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_micro_batch_size_does_not_change_scores(checkpoint, tokenizer_dir):
    frames = random_frames(batch=3, frames=3, seed=5)
    prompts = PROMPTS + ["a boat"]
    one = make_reward(checkpoint[0], tokenizer_dir, micro_batch_size=1).score(frames, prompts)["score"]
    many = make_reward(checkpoint[0], tokenizer_dir, micro_batch_size=64).score(frames, prompts)["score"]
    torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


def test_wrong_or_missing_checkpoint_gives_clear_error(tmp_path, tokenizer_dir):
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}}, wrong)
    with pytest.raises(VpoError, match="missing visual.conv1.weight"):
        make_reward(wrong, tokenizer_dir)
    with pytest.raises(VpoError, match="does not exist"):
        make_reward(tmp_path / "absent.pt", tokenizer_dir)
    not_torch = tmp_path / "text.pt"
    not_torch.write_text("hello")
    with pytest.raises(VpoError, match="could not read HPSv2 checkpoint"):
        make_reward(not_torch, tokenizer_dir)
    foreign = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(foreign)
    with pytest.raises(VpoError, match="not a CLIPModel"):
        make_reward(foreign, tokenizer_dir)


def test_unknown_weights_are_refused(checkpoint, tokenizer_dir, tmp_path):
    extra = tmp_path / "extra.pt"
    torch.save({"state_dict": checkpoint[1] | {"visual.attn_pool.query": torch.zeros(4)}}, extra)
    with pytest.raises(VpoError, match="visual.attn_pool.query"):
        make_reward(extra, tokenizer_dir)


def test_plugin_registers_reward_and_command():
    from vpo_hpsv2 import plugin

    registered = {}
    plugin.vpo_register_rewards(register=lambda name, factory, config: registered.update({name: config}))
    assert registered == {"hpsv2": HPSv2Config}
    commands = {}
    plugin.vpo_register_commands(register=lambda name, configure, run, help="": commands.update({name: run}))
    assert list(commands) == ["hpsv2"]


def test_vit_h_14_shapes_give_the_published_architecture():
    """Shapes of the real HPSv2 checkpoint (meta tensors, no memory): default heads and sizes are ViT-H-14's."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    from vpo_hpsv2.convert import clip_config_from_state_dict, convert_state_dict

    def block(prefix, width):
        shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
                  "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
                  "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
                  "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
                  "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
        return {prefix + k: v for k, v in shapes.items()}

    shapes = {
        "visual.conv1.weight": (1280, 3, 14, 14), "visual.class_embedding": (1280,),
        "visual.positional_embedding": (257, 1280), "visual.ln_pre.weight": (1280,), "visual.ln_pre.bias": (1280,),
        "visual.ln_post.weight": (1280,), "visual.ln_post.bias": (1280,), "visual.proj": (1280, 1024),
        "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024), "ln_final.weight": (1024,),
        "ln_final.bias": (1024,), "text_projection": (1024, 1024), "logit_scale": (),
    }
    for i in range(32):
        shapes |= block(f"visual.transformer.resblocks.{i}.", 1280)
    for i in range(24):
        shapes |= block(f"transformer.resblocks.{i}.", 1024)
    state_dict = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = clip_config_from_state_dict(state_dict)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1280, 32, 16)
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (14, 224, 5120)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (1024, 24, 16)
    assert (text.vocab_size, vision.hidden_act) == (49408, "gelu")
    assert (text.max_position_embeddings, config.projection_dim, text.hidden_act) == (77, 1024, "gelu")
    with init_empty_weights():
        expected = CLIPModel(config).state_dict()
    converted = convert_state_dict(state_dict, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
