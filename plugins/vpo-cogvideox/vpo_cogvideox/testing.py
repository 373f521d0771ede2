"""A tiny random CogVideoX pipeline in the published diffusers layout, for tests and toy runs.

``build_tiny_cogvideox(directory)`` writes ``model_index.json`` plus the ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` subfolders with ``save_pretrained``, exactly like
``THUDM/CogVideoX-2b`` (or ``-5b`` with ``variant="5b"``), so the real loading code reads it. It makes
9-frame 32x32 videos (3 latent frames of 4 channels at 8x8) and builds in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vpo_core.testing import word_level_t5_tokenizer  # noqa: F401  (also used by vpo-toyworld)

# Words the tokenizer knows; anything else maps to <unk>. Enough for test prompts to differ.
_WORDS = (
    "a an the of in on with and is at to by cat dog bird fish horse car boat tree flower river sea sky city "
    "street forest mountain beach snow rain sun moon night day red blue green yellow white black running "
    "walking flying swimming jumping dancing playing sitting video photo of close up slow motion"
).split()

TINY_HEIGHT = 32
TINY_WIDTH = 32
TINY_FRAMES = 9


def build_tiny_cogvideox(
    directory: str | Path, seed: int = 0, variant: str = "2b", max_text_length: int = 226
) -> Path:
    """Write a tiny random CogVideoX pipeline to ``directory`` and return its path.

    ``variant="2b"``: sincos positions + CogVideoXDDIMScheduler (like THUDM/CogVideoX-2b).
    ``variant="5b"``: rotary positions + CogVideoXDPMScheduler (like THUDM/CogVideoX-5b).
    ``max_text_length``: the text length the transformer is built for (CogVideoX's own is 226).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    if variant not in ("2b", "5b"):
        raise ValueError(f"variant must be '2b' or '5b', got {variant!r}")
    directory = Path(directory)
    spatial, temporal = 4, 4  # 3 VAE levels: x4 in space; time x4 (9 frames -> 3 latent frames)

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        # rotary embeddings split the head dim 1/4 time + 3/8 height + 3/8 width, each even: 16 for 5b
        attention_head_dim=8 if variant == "2b" else 16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=TINY_WIDTH // spatial,
        sample_height=TINY_HEIGHT // spatial,
        sample_frames=TINY_FRAMES,
        patch_size=2,
        temporal_compression_ratio=temporal,
        max_text_seq_length=max_text_length,
        use_rotary_positional_embeddings=variant == "5b",
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=temporal,
        sample_height=TINY_HEIGHT,
        sample_width=TINY_WIDTH,
    )
    tokenizer = word_level_t5_tokenizer(_WORDS, max_text_length)
    vocab_size = len(tokenizer)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    # The published schedulers' settings (2b: DDIM with snr shift 3; 5b: DPM with snr shift 1).
    scheduler_kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    if variant == "2b":
        scheduler = CogVideoXDDIMScheduler(snr_shift_scale=3.0, **scheduler_kwargs)
    else:
        scheduler = CogVideoXDPMScheduler(snr_shift_scale=1.0, **scheduler_kwargs)

    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(directory)
    return directory
