"""Tiny random Wan pipelines in the published diffusers layouts, for tests and benchmarks.

``build_tiny_wan(directory, variant=...)`` writes ``model_index.json`` and the component subfolders with
``WanPipeline.save_pretrained``, as the ``Wan-AI/*-Diffusers`` repositories are laid out, so the real loading code
reads it:

* ``"2.1"``: one transformer, 16-channel-style VAE, UniPC with flow_shift 3 (like Wan2.1-T2V-1.3B/14B-Diffusers);
* ``"2.2-a14b"``: two experts split at ``boundary_ratio`` 0.875, flow_shift 12 (like Wan2.2-T2V-A14B-Diffusers);
* ``"2.2-ti2v"``: ``expand_timesteps`` and the residual, patchified VAE with 16x spatial compression (like
  Wan2.2-TI2V-5B-Diffusers).

``scheduler="euler"`` ships a FlowMatchEulerDiscreteScheduler instead of UniPC. 9 frames (3 latent frames) at
32x32 (2.1, A14B) or 64x64 (TI2V); each builds in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vpo_core.testing import word_level_t5_tokenizer

_VOCABULARY = (
    "a the of in on with and at cat dog bird fox car boat tree river sea sky city forest snow rain sun night "
    "red blue green white black running walking flying swimming jumping slowly quickly video"
).split()
VARIANTS = ("2.1", "2.2-a14b", "2.2-ti2v")
TINY_FRAMES = 9


def tiny_size(variant: str) -> int:
    """Height and width (pixels) the tiny pipeline of ``variant`` is meant for."""
    return 64 if variant == "2.2-ti2v" else 32


def build_tiny_wan(directory: str | Path, seed: int = 0, variant: str = "2.1", scheduler: str = "unipc") -> Path:
    """Write a tiny random Wan pipeline to ``directory`` and return its path."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ti2v, a14b = variant == "2.2-ti2v", variant == "2.2-a14b"
    latent_channels = 4
    torch.manual_seed(seed)

    def transformer():
        # head dim 12: Wan's rotary embedding splits it 4 (time) + 4 (height) + 4 (width)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=latent_channels, out_channels=latent_channels, text_dim=32,
                                     freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)

    # Per-channel latent statistics that are not 0/1, so the latent normalisation is exercised.
    statistics = dict(latents_mean=[0.1 * (c - 1.5) for c in range(latent_channels)],
                      latents_std=[1.0 + 0.25 * c for c in range(latent_channels)])
    if ti2v:  # Wan2.2's VAE: residual blocks on 2x2-patchified pixels, 4x16x16 compression
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1],
                               num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                               in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, **statistics)
    else:
        vae = AutoencoderKLWan(base_dim=8, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], **statistics)
    tokenizer = word_level_t5_tokenizer(_VOCABULARY, 512)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    shift = 12.0 if a14b else 5.0 if ti2v else 3.0  # the published checkpoints' flow_shift
    if scheduler == "euler":
        noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        noise_scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=noise_scheduler,
                       transformer=transformer(), transformer_2=transformer() if a14b else None,
                       boundary_ratio=0.875 if a14b else None, expand_timesteps=ti2v)
    pipe.save_pretrained(directory)
    return Path(directory)
