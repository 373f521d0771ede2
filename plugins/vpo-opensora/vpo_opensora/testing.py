"""A tiny random Open-Sora v1.2 in the published layouts, for tests and toy runs.

``build_tiny_opensora(directory)`` writes three directories that the policy's real loading code reads exactly as
it reads the hub ids (point ``model``, ``vae`` and ``text_encoder`` of a spec at them, see ``tiny_config``):

* ``transformer/``: STDiT3 ``config.json`` + ``model.safetensors`` in Open-Sora's key names (like
  ``hpcai-tech/OpenSora-STDiT-v3``),
* ``vae/``: ``config.json`` + ``model.safetensors`` with ``spatial_vae.module.*`` / ``temporal_vae.*`` / ``scale`` /
  ``shift`` (like ``hpcai-tech/OpenSora-VAE-v1.2``; the tiny 2-D VAE's architecture in ``vae/spatial_vae/vae``),
* ``text_encoder/``: a 1-layer T5 encoder (safetensors) and a word-level tokenizer (like ``DeepFloyd/t5-v1_1-xxl``).

Videos of 17 frames at 32x32 (5 latent frames of 4 x 4 x 4); builds in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vpo_core.testing import word_level_t5_tokenizer

TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH = 17, 32, 32
# Words the tokenizer knows (anything else is <unk>): enough for test prompts to differ, plus the score suffix.
_WORDS = ("a an the of in on with and is at to by cat dog bird fish horse car boat tree flower river sea sky city "
          "street forest mountain beach snow rain sun moon night day red blue green yellow white black running "
          "walking flying swimming jumping dancing playing sitting video close up slow motion aesthetic score "
          ": . , 0 1 2 3 4 5 6 7 8 9").split()


def tiny_config(directory: str | Path, **overrides):
    """An ``OpenSoraConfig`` for the tiny model in ``directory`` (17 frames, 32x32, 3 steps)."""
    from .config import OpenSoraConfig

    directory = Path(directory)
    settings = dict(model=str(directory / "transformer"), vae=str(directory / "vae"),
                    text_encoder=str(directory / "text_encoder"), num_frames=TINY_FRAMES, height=TINY_HEIGHT,
                    width=TINY_WIDTH, num_inference_steps=3)
    return OpenSoraConfig(**{**settings, **overrides})


def build_tiny_opensora(directory: str | Path, seed: int = 0, max_text_length: int = 300) -> Path:
    """Write a tiny random Open-Sora v1.2 to ``directory`` and return its path."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from .stdit3 import STDiT3, STDiT3Config
    from .vae import OpenSoraVAE, TemporalVAE

    directory = Path(directory)
    torch.manual_seed(seed)
    text_dim = 32
    STDiT3(STDiT3Config(hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=text_dim,
                        model_max_length=max_text_length)).save_pretrained(directory / "transformer")

    levels = 4  # x8 in space, as the SD VAE
    spatial = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
                            block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=TINY_HEIGHT)
    temporal = TemporalVAE(filters=8, num_res_blocks=1, channel_multipliers=(1, 2, 2, 4),
                           temporal_downsample=(False, True, True), num_groups=2)
    vae = OpenSoraVAE(spatial, temporal, shift=(-0.10, 0.34, 0.27, 0.98), scale=(3.85, 2.32, 2.33, 3.06))
    vae.save_pretrained(directory / "vae")

    tokenizer = word_level_t5_tokenizer(_WORDS, max_text_length)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=1,
                                      num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                      pad_token_id=0, eos_token_id=1))
    encoder.save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "text_encoder")
    return directory
