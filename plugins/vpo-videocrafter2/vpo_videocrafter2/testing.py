"""A tiny random VideoCrafter2 in the published layout, for tests and toy runs.

``build_tiny_videocrafter2(directory)`` writes ``model.ckpt`` the way ``VideoCrafter/VideoCrafter2`` ships it: a
Lightning-style ``{"state_dict": ...}`` saved with ``torch.save`` (plain tensors, so ``weights_only`` loading works),
with the original key names: ``model.diffusion_model.*`` (LVDM UNet), ``first_stage_model.*`` (LDM VAE),
``cond_stage_model.model.*`` (OpenCLIP text tower), plus LVDM's schedule buffers the loader ignores. Next to it,
``tokenizer/``: a CLIP BPE tokenizer over the 256 byte symbols that loads offline. The policy reads the directory
through the same code a hub id takes. It makes 4-frame 16x16 videos (latents 4 x 4 x 8 x 8).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from vpo_core.openclip import text_tower_shapes

from .checkpoint import TEXT, UNET, VAE
from .unet import LVDMUNet, UNetConfig

TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH = 4, 16, 16
TEXT_WIDTH, TEXT_BLOCKS, TEXT_CONTEXT = 64, 2, 77  # 2 blocks: the penultimate-layer encoder keeps 1
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                       num_head_channels=16, context_dim=TEXT_WIDTH)
VAE_CHANNELS, VAE_MULT, VAE_RES_BLOCKS, LATENT_CHANNELS = 32, (1, 2), 1, 4  # downsamples x2


def _random(shape: tuple[int, ...], name: str, generator: torch.Generator) -> torch.Tensor:
    """Weights on a sensible scale: norms near 1, small biases, fan-in scaled matrices and kernels."""
    noise = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        return 1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise  # 1-D weights are norms
    return noise / math.sqrt(math.prod(shape[1:]))


# ----------------------------------------------------------------------------------------------- LDM VAE keys
def ldm_vae_shapes(ch: int = VAE_CHANNELS, ch_mult=VAE_MULT, num_res_blocks: int = VAE_RES_BLOCKS,
                   z: int = LATENT_CHANNELS) -> dict[str, tuple[int, ...]]:
    """Names and shapes of LDM's ``AutoencoderKL`` (``lvdm/modules/networks/ae_modules.py`` Encoder / Decoder with
    ``double_z``, no attention but the middle one) for the given ``ddconfig``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def middle(name, c):
        resnet(f"{name}.mid.block_1", c, c), resnet(f"{name}.mid.block_2", c, c), norm(f"{name}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.mid.attn_1.{part}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    middle("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, 2 * z, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", z, block_in, 3), middle("decoder", block_in)
    for level in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    return shapes


# ----------------------------------------------------------------------------------------------- text tower
def byte_level_clip_tokenizer():
    """A CLIP BPE tokenizer over the 256 byte symbols (no merges), start/end of text last: 514 tokens, offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab |= {symbol + "</w>": len(alphabet) + i for i, symbol in enumerate(alphabet)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_CONTEXT)


# ----------------------------------------------------------------------------------------------- checkpoint
def tiny_state_dict(seed: int = 0, unet: UNetConfig = TINY_UNET, vae_mult: tuple[int, ...] = VAE_MULT
                    ) -> dict[str, torch.Tensor]:
    """Random weights of the three models under VideoCrafter2's original key names."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in LVDMUNet(unet).state_dict().items()}
    state = {UNET + k: _random(shape, k, generator) for k, shape in names.items()}
    state |= {VAE + k: _random(shape, k, generator) for k, shape in ldm_vae_shapes(ch_mult=vae_mult).items()}
    shapes = text_tower_shapes(TEXT_WIDTH, TEXT_BLOCKS, TEXT_CONTEXT, vocab_size=514)  # the byte-level tokenizer's
    text = {TEXT + k: _random(shape, k, generator) for k, shape in shapes.items()}
    text[TEXT + "logit_scale"] = torch.tensor(math.log(100.0))
    return state | text


def build_tiny_videocrafter2(directory: str | Path, seed: int = 0, needs_pickle: bool = False,
                             unet: UNetConfig = TINY_UNET, vae_mult: tuple[int, ...] = VAE_MULT) -> Path:
    """Write ``model.ckpt`` and ``tokenizer/`` to ``directory`` and return it. ``needs_pickle``: add Lightning's
    ``hyper_parameters`` as a Python object, so that the file needs full unpickling (as many Lightning files do).
    ``unet`` / ``vae_mult``: another (e.g. larger) UNet, whose ``context_dim`` must stay the text tower's width
    (64), and VAE channel multipliers (of 32 channels; 4 levels downsample by 8 as VideoCrafter2's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = tiny_state_dict(seed, unet, vae_mult)
    # LatentDiffusion's own buffers are in the state dict too; the loader ignores them.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
              "scale_arr": torch.cat([torch.linspace(1, 0.7, 400), torch.full((1000,), 0.7)])}
    checkpoint = {"state_dict": state, "epoch": 0, "global_step": 0}
    if needs_pickle:
        checkpoint["hyper_parameters"] = argparse.Namespace(base_learning_rate=6e-6)
    torch.save(checkpoint, directory / "model.ckpt")
    byte_level_clip_tokenizer().save_pretrained(directory / "tokenizer")
    return directory


def tiny_config(directory: str | Path, **overrides):
    """A ``VideoCrafter2Config`` for the tiny model in ``directory`` (4 frames, 16x16, 4 DDIM steps)."""
    from .config import VideoCrafter2Config

    values = dict(model=str(directory), tokenizer=str(Path(directory) / "tokenizer"), num_frames=TINY_FRAMES,
                  height=TINY_HEIGHT, width=TINY_WIDTH, num_inference_steps=4, micro_batch_size=4,
                  lora={"rank": 4, "alpha": 4})
    return VideoCrafter2Config(**(values | overrides))
