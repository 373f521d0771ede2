"""CogVideoX (THUDM/CogVideoX-2b, -5b) as a vpo policy, built on diffusers' CogVideoXPipeline.

Layouts: latents are ``[B, F, C, H, W]`` scaled by the VAE scaling factor (the transformer's space);
frames are ``[B, T, C, H, W]`` in [0, 1]. The sampling loop follows ``CogVideoXPipeline.__call__`` step for
step (same helpers, same order of random draws) so that a row equals what the stock pipeline makes for
that prompt with ``generator=torch.Generator().manual_seed(seed)``; it differs only in running many rows
at once, one generator per row, and keeping a graph in the last steps when asked. What this shares with the
other diffusers policies (batching, text cache, gradient window, trajectories, adapters, saving) lives in
``vpo_core.diffusers_policy``.
"""

from __future__ import annotations

import math

import torch
from vpo_core import BuildContext, GradientWindow, VpoError
from vpo_core.diffusers_policy import DiffusersVideoPolicy, load_pipeline_parts
from vpo_core.sampling import ddim_step, row_generators

from .config import CogVideoXConfig


# ----------------------------------------------------------------------------------------------- loading
def load_pipeline(model: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load the five CogVideoX components from a hub id or a local diffusers-layout directory."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    scheduler, parts = load_pipeline_parts(
        model, revision, kind="CogVideoX", example="THUDM/CogVideoX-2b",
        schedulers=("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"), components=lambda path: {
            "transformer": (CogVideoXTransformer3DModel, {"torch_dtype": dtype}),
            "vae": (AutoencoderKLCogVideoX, {"torch_dtype": dtype}),
            "text_encoder": (T5EncoderModel, {"dtype": dtype}),
            "tokenizer": (AutoTokenizer, {"trust_remote_code": trust_remote_code}),
        })
    return CogVideoXPipeline(scheduler=scheduler, **parts)


def build(config: CogVideoXConfig, context: BuildContext) -> "CogVideoXPolicy":
    """Factory registered as policy ``cogvideox``."""
    return CogVideoXPolicy(config, context)


# ----------------------------------------------------------------------------------------------- policy
class CogVideoXPolicy(DiffusersVideoPolicy):
    """The CogVideoX policy: LoRA (or full) fine-tuning of the transformer; VAE and T5 stay frozen."""

    kind = "cogvideox"

    def __init__(self, config: CogVideoXConfig, context: BuildContext):
        from diffusers import CogVideoXDPMScheduler

        super().__init__(config, context)
        if config.attention == "xformers" and self.device.type != "cuda":
            raise VpoError(
                f"attention: xformers needs a CUDA device, but the policy runs on {self.device}. "
                "Use attention: sdpa (the default; PyTorch picks its fastest kernel)."
            )
        self.pipe = pipe = load_pipeline(config.model, config.revision, self.frozen_dtype, context.trust_remote_code)
        self._is_dpm = isinstance(pipe.scheduler, CogVideoXDPMScheduler)
        self.max_sequence_length = config.max_sequence_length or pipe.transformer.config.max_text_seq_length
        self._check_shapes()
        if config.attention == "xformers":
            from .attention import use_xformers

            use_xformers(pipe.transformer)
        # LoRA with the reference as disabled adapters / a "reference" adapter, or full fine-tuning with a frozen
        # copy of the base (2B: ~6.8 GB more in float32; 5B: ~22 GB).
        self._setup(pipe, ["transformer"], context.seed)
        self.transformer = pipe.transformer
        self._rotary_cache: dict[tuple[int, int, int], object] = {}

    # ------------------------------------------------------------------------------------------- setup
    def _check_shapes(self) -> None:
        c, pipe = self.config, self.pipe
        trained_length = pipe.transformer.config.max_text_seq_length
        # Without rotary embeddings (CogVideoX-2b) the positional table spans text + video tokens, so the
        # text must be padded to exactly the length the transformer was built for.
        sincos_positions = not pipe.transformer.config.use_rotary_positional_embeddings
        if sincos_positions and self.max_sequence_length != trained_length:
            raise VpoError(
                f"max_sequence_length={self.max_sequence_length} does not match this transformer's "
                f"max_text_seq_length={trained_length}: remove max_sequence_length from the spec (it defaults to "
                f"the model's) or set it to {trained_length}."
            )
        ratio = pipe.vae_scale_factor_temporal
        if (c.num_frames - 1) % ratio:
            raise VpoError(
                f"num_frames={c.num_frames} does not fit this VAE: num_frames - 1 must be divisible by its temporal "
                f"compression {ratio} (e.g. {ratio + 1}, {4 * ratio + 1}, {12 * ratio + 1})."
            )
        cell = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size
        if c.height % cell or c.width % cell:
            raise VpoError(f"height and width must be multiples of {cell} for this model, got {c.height}x{c.width}.")
        patch_t = pipe.transformer.config.patch_size_t
        if patch_t is not None and self.latent_frames % patch_t:
            raise VpoError(
                f"num_frames={c.num_frames} gives {self.latent_frames} latent frames, not a multiple of the "
                f"transformer's patch_size_t={patch_t} (CogVideoX 1.5): choose num_frames accordingly."
            )

    @property
    def latent_frames(self) -> int:
        return (self.config.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1

    # ------------------------------------------------------------------------------------------- denoiser
    def _rotary(self, latent_frames: int, height: int, width: int):
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        key = (latent_frames, height, width)
        if key not in self._rotary_cache:
            self._rotary_cache[key] = self.pipe._prepare_rotary_positional_embeddings(
                height, width, latent_frames, self.device)
        return self._rotary_cache[key]

    def _predict(self, latents, embeds, timestep) -> torch.Tensor:
        scale = self.pipe.vae_scale_factor_spatial
        rotary = self._rotary(latents.shape[1], latents.shape[-2] * scale, latents.shape[-1] * scale)
        with self.transformer.cache_context("cond_uncond"):
            return self._denoiser()(hidden_states=latents, encoder_hidden_states=embeds, timestep=timestep,
                                         image_rotary_emb=rotary, return_dict=False)[0]

    def _guidance(self, timesteps: torch.Tensor) -> float | torch.Tensor:
        c = self.config
        if not c.use_dynamic_cfg:
            return c.guidance_scale
        steps = c.num_inference_steps  # the stock pipeline's formula, verbatim (t is a timestep, not a step index)
        values = [1 + c.guidance_scale * ((1 - math.cos(math.pi * ((steps - t) / steps) ** 5.0)) / 2)
                  for t in timesteps.tolist()]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, device=self.device).view(-1, 1, 1, 1, 1)

    def _guided(self, latents: torch.Tensor, condition, timesteps: torch.Tensor) -> torch.Tensor:
        """The guided v-prediction (float32) for ``latents`` at per-row ``timesteps`` [B], as the stock loop."""
        embeds, negative = condition
        if negative is None:
            return self._predict(latents, embeds, timesteps).float()
        prediction = self._predict(torch.cat([latents] * 2), torch.cat([negative, embeds]), timesteps.repeat(2))
        uncond, text = prediction.float().chunk(2)
        return uncond + self._guidance(timesteps) * (text - uncond)

    # ------------------------------------------------------------------------------------------- sampling
    def _initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        # One CPU generator per row: randn_tensor draws row i from generators[i], as the stock pipeline given
        # generator=[...], so a row's noise does not depend on its batch.
        c = self.config
        return self.pipe.prepare_latents(len(generators), self.transformer.config.in_channels, c.num_frames,
                                         c.height, c.width, self.dtype, self.device, generators)

    def _denoise(self, prompts, seeds, grad_steps: int, window: GradientWindow | None) -> torch.Tensor:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        scheduler = self.scheduler
        condition = self._condition(prompts)
        timesteps, _ = retrieve_timesteps(scheduler, self.config.num_inference_steps, self.device)
        generators = row_generators(seeds)
        latents = self._initial_latents(generators)
        step_kwargs = self.pipe.prepare_extra_step_kwargs(generators, 0.0)
        old_pred_original_sample = None  # DPM-solver++ state
        with self._gradient_window(len(timesteps), grad_steps, window) as with_grad:
            for i, t in enumerate(timesteps):
                with torch.set_grad_enabled(with_grad(i)):
                    noise_pred = self._guided(latents, condition, t.expand(len(seeds)))
                    if self._is_dpm:
                        latents, old_pred_original_sample = scheduler.step(
                            noise_pred, old_pred_original_sample, t, timesteps[i - 1] if i > 0 else None, latents,
                            **step_kwargs, return_dict=False)
                    else:
                        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                    latents = latents.to(self.dtype)
        return latents

    # ------------------------------------------------------------------------------------------- trajectories
    def _schedule(self) -> dict[str, torch.Tensor]:
        """The sampler's timesteps with their alpha-bars: DDIM's own transition (2b), and for CogVideoXDPMScheduler
        checkpoints (5b) the same DDIM-eta transition on the same timesteps and alphas (its multistep solver has no
        single-step Gaussian form)."""
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        scheduler = self.scheduler
        timesteps, _ = retrieve_timesteps(scheduler, self.config.num_inference_steps, self.device)
        previous = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod.to(self.device)
        final = scheduler.final_alpha_cumprod.to(self.device)
        return {"timesteps": timesteps, "alphas": alphas[timesteps].float(),
                "alphas_prev": torch.where(previous >= 0, alphas[previous.clamp(min=0)], final).float()}

    def _transition_distribution(self, x, condition, steps, noise_level: float, schedule):
        """DDIM with eta = noise_level (DDPO's ``ddim_with_logprob``): the v-prediction gives x0 and eps with the
        scheduler's alpha-bars; the last step into alpha-bar 1 has std 0 (deterministic)."""
        v = self._guided(x, condition, schedule["timesteps"][steps])
        alpha, alpha_prev = schedule["alphas"][steps], schedule["alphas_prev"][steps]
        a = alpha.view(-1, *[1] * (x.dim() - 1))
        x = x.float()
        pred_x0 = a.sqrt() * x - (1 - a).sqrt() * v
        pred_eps = a.sqrt() * v + (1 - a).sqrt() * x
        return ddim_step(x, pred_x0, pred_eps, alpha, alpha_prev, noise_level)

    # ------------------------------------------------------------------------------------------- VAE
    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        # The VAE is causal in time and decodes latent frames in pairs: k latent frames give 4k-3 frames for odd k
        # and 4k for even k (k=1: one frame, the "first frame" of a clip), not a slice of the full video's frames.
        return self.pipe.decode_latents(latents.to(self.vae.dtype))  # [B, C, T, H, W] in [-1, 1]

    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(video).latent_dist.mode() * self.pipe.vae_scaling_factor_image
        return latents.permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        high = self.scheduler.config.num_train_timesteps
        return torch.randint(0, high, (batch_size,), generator=generator, device=generator.device).to(self.device)

    def denoising_loss(
        self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample v-prediction MSE ``[B]``: x_t = add_noise(x0, noise, t), target = get_velocity(x0, noise, t)."""
        x0 = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device).long()
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        target = self.scheduler.get_velocity(x0, noise, timesteps)
        prediction = self._predict(noisy.to(self.dtype), self.embed_prompts(list(prompts)), timesteps).float()
        return (prediction - target).pow(2).flatten(1).mean(dim=1)
