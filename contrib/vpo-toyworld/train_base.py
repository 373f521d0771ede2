"""Train the toy world's base text-to-video model: a tiny CogVideoX, saved in stock diffusers layout.

    python contrib/vpo-toyworld/train_base.py --output contrib/vpo-toyworld/vpo_toyworld/weights/toyworld-cogvideox

Stage A trains the 3-level CogVideoX VAE as an autoencoder (MSE + small KL) on rendered clips.
Stage B freezes the VAE and a randomly initialised 1-layer T5 encoder (a fixed featuriser of the prompt
words; the transformer's text projection and joint attention learn to read it) and trains the transformer
with the v-prediction loss on scaled latents, dropping 10% of prompts to "" so classifier-free guidance works.
Everything runs on CPU from one seed (repeatable for a fixed thread count).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.training_utils import EMAModel
from transformers import T5Config, T5EncoderModel
from vpo_cogvideox.testing import word_level_t5_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vpo_toyworld import world  # noqa: E402


def build_text_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(config)


def build_vae() -> AutoencoderKLCogVideoX:
    # Three levels: 4x spatial and 4x temporal compression (9 frames -> 3 latent frames -> 9 frames).
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        temporal_compression_ratio=4,
        sample_height=world.SIZE,
        sample_width=world.SIZE,
    )


def build_transformer(text_dim: int, args) -> CogVideoXTransformer3DModel:
    latent_size = world.SIZE // 4
    return CogVideoXTransformer3DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=64,
        text_embed_dim=text_dim,
        num_layers=args.layers,
        sample_width=latent_size,
        sample_height=latent_size,
        sample_frames=world.NUM_FRAMES,
        patch_size=args.patch_size,
        temporal_compression_ratio=4,
        # The text length prompts are padded to. CogVideoX-2b uses 226; the toy prompts have at most 12 tokens,
        # and a short pad keeps the joint attention on the words instead of on 200 padding tokens.
        max_text_seq_length=args.text_tokens,
    )


def build_scheduler() -> CogVideoXDDIMScheduler:
    # CogVideoX-2b's scheduler settings.
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
        timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
    )


def render_pool(prompts: list[str], clips_per_prompt: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Clips ``[N, T, C, H, W]`` in [0,1] and, per clip, the index of its prompt."""
    clips, prompt_index = [], []
    for i, prompt in enumerate(prompts):
        for k in range(clips_per_prompt):
            clips.append(world.render(prompt, seed * 1_000_003 + i * 1000 + k))
            prompt_index.append(i)
    return torch.stack(clips), prompt_index


def to_vae_layout(clips: torch.Tensor) -> torch.Tensor:
    """[B,T,C,H,W] in [0,1] -> [B,C,T,H,W] in [-1,1] (what the CogVideoX VAE expects)."""
    return clips.permute(0, 2, 1, 3, 4) * 2 - 1


def cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, clips: torch.Tensor, args, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr)
        index = torch.randint(len(clips), (args.vae_batch,), generator=generator)
        x = to_vae_layout(clips[index])
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        reconstruction = vae.decode(z).sample
        mse = F.mse_loss(reconstruction, x)
        # KL to N(0, 1) per latent element (diffusers' .kl() sums over 4-D dims only, so write it out).
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            print(f"[vae] step {step:5d}  mse {mse.item():.5f}  kl/elem {kl.item():.3f}  {time.time() - start:6.0f}s",
                  flush=True)
    vae.eval()


@torch.no_grad()
def encode_pool(vae, clips: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Posterior means ``[N, F, C, h, w]`` (the transformer's layout), unscaled."""
    latents = []
    for chunk in clips.split(batch):
        latents.append(vae.encode(to_vae_layout(chunk)).latent_dist.mode())
    return torch.cat(latents).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    # Same call as CogVideoXPipeline._get_t5_prompt_embeds: pad to max length, no attention mask.
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_transformer(transformer, scheduler, latents, prompt_index, prompt_embeds, null_embed, args, generator):
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.01)
    # An exponential moving average of the weights gives cleaner samples after a short, noisy training run.
    ema = EMAModel(transformer.parameters(), decay=args.ema_decay)
    transformer.train()
    prompt_index = torch.tensor(prompt_index)
    start = time.time()
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        index = torch.randint(len(latents), (args.batch,), generator=generator)
        x0 = latents[index]
        text = prompt_embeds[prompt_index[index]]
        dropped = torch.rand(args.batch, generator=generator) < args.prompt_dropout
        text = torch.where(dropped.view(-1, 1, 1), null_embed.expand_as(text), text)
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.get_velocity(x0, noise, timesteps)
        prediction = transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=timesteps).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema.step(transformer.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"[dit] step {step:5d}  v-loss {loss.item():.4f}  ema {running:.4f}  {time.time() - start:6.0f}s",
                  flush=True)
    ema.copy_to(transformer.parameters())
    transformer.eval()
    return running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="directory for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a CPU shared with other jobs, 2 OpenMP threads ran 5-10x slower")
    parser.add_argument("--clips-per-prompt", type=int, default=16)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=4500, help="transformer steps")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16, help="prompt length in tokens, padding included")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    # No torch.use_deterministic_algorithms: its CPU conv3d backward is ~30x slower here. CPU kernels are
    # repeatable for a fixed seed and thread count.
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()

    prompts = world.train_prompts()
    clips, prompt_index = render_pool(prompts, args.clips_per_prompt, args.seed)
    print(f"rendered {len(clips)} clips of {len(prompts)} training prompts", flush=True)

    vae = build_vae()
    train_vae(vae, clips, args, generator)
    latents = encode_pool(vae, clips)
    # Unit-variance latents for the diffusion model; the pipeline divides by this factor before decoding.
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    print(f"latents {tuple(latents.shape[1:])}, scaling_factor {scaling_factor:.4f}", flush=True)

    # Word-level over the toy world's vocabulary, T5's special tokens (and </s> appended).
    tokenizer = word_level_t5_tokenizer(world.vocabulary(), args.text_tokens)
    text_encoder = build_text_encoder(len(tokenizer)).eval().requires_grad_(False)
    prompt_embeds = encode_prompts(tokenizer, text_encoder, prompts)
    null_embed = encode_prompts(tokenizer, text_encoder, [""])

    transformer = build_transformer(text_encoder.config.d_model, args)
    scheduler = build_scheduler()
    final_loss = train_transformer(transformer, scheduler, latents, prompt_index, prompt_embeds, null_embed, args,
                                   generator)

    pipeline = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=scheduler)
    pipeline.save_pretrained(args.output, safe_serialization=True)
    print(f"saved {args.output}; final v-loss (ema) {final_loss:.4f}; total {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
