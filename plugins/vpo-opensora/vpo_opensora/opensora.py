"""Open-Sora v1.2 (STDiT3 + video VAE + T5-XXL, rectified flow) as a vpo policy.

Layouts: latents are ``[B, T', C, h, w]`` (latent frames first, like the other policies; the models take
``[B, C, T', h, w]``), normalised by the VAE's shift/scale; frames are ``[B, T, 3, H, W]`` in [0, 1].

Sampling follows Open-Sora v1.2.0's ``RFLOW.sample`` (``opensora/schedulers/rf``) step for step: timesteps
``t_i = (1 - i/N) * 1000`` through the resolution- and length-dependent transform ``t' = r t / (1 + (r - 1) t)``
(on t/1000, ``r = sqrt(H W / 512^2) * sqrt((frames // 17) * 5)``, 1 for an image), Euler steps
``z += v * (t_i - t_{i+1}) / 1000`` with the model's velocity ``v = x0 - noise`` (the negative of diffusers'
flow-matching velocity), and classifier-free guidance against the learned null caption
``v = v_null + s (v_text - v_null)``. Each row's initial noise is ``torch.randn(C, T', h, w)`` from its own seed
(the original's ``[B, C, T, H, W]`` layout), so a row does not depend on its batch.

Training: ``x_t = (1 - t/1000) x0 + (t/1000) noise``, per-sample mean of ``(v - (x0 - noise))^2`` over all non-batch
dims, with Open-Sora's training timesteps: ``t = sigmoid(N(0, 1)) * 1000`` (logit-normal) through the same
transform at the policy's video size.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from vpo_core import (BuildContext, GradientWindow, Rollout, Trajectory, TrajectorySettings, Transition, VpoError,
                      derive_seed, iter_chunks)
from vpo_core import TrainablePolicy
from vpo_core.adapters import TrainableModule
from vpo_core.sampling import flow_sde_step, gaussian_log_prob, randn_rows, row_generators, stochastic_step

from .config import OpenSoraConfig
from .stdit3 import STDiT3
from .text import load_text_encoder, prepare_prompt
from .vae import OpenSoraVAE

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
IMAGE_FPS = 120  # fps conditioning of single-frame samples in the original


def build(config: OpenSoraConfig, context: BuildContext) -> "OpenSoraPolicy":
    """Factory registered as policy ``opensora``."""
    return OpenSoraPolicy(config, context)


class OpenSoraPolicy(TrainablePolicy):
    """LoRA (or full) fine-tuning of STDiT3; the VAE and T5 stay frozen."""

    def __init__(self, config: OpenSoraConfig, context: BuildContext):
        self.config = config
        self.device = torch.device(config.device) if config.device else torch.device(context.device)
        frozen_dtype = _DTYPES[config.dtype or _MIXED_PRECISION_DTYPES.get(context.mixed_precision, "float32")]
        self.transformer = transformer = STDiT3.from_pretrained(config.model, frozen_dtype)
        self.vae = OpenSoraVAE.from_pretrained(config.vae, frozen_dtype, config.vae_micro_batch_size)
        self.text_encoder, self.tokenizer = load_text_encoder(config.text_encoder, frozen_dtype,
                                                              context.trust_remote_code)
        self._check_parts()
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        # LoRA with the reference as disabled adapters / a "reference" adapter, or full fine-tuning with a frozen copy
        # of the base (STDiT-v3, 1.1 B parameters: 4.5 GB more in float32).
        self.trainable = TrainableModule(transformer, None if config.full_finetune else config.lora, context.seed)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.to(self.device)
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _check_parts(self) -> None:
        c, t = self.config, self.transformer.config
        d_model = self.text_encoder.config.d_model
        if d_model != t.caption_channels:
            raise VpoError(f"text encoder {c.text_encoder!r} makes {d_model}-dim features but STDiT3 {c.model!r} "
                           f"takes caption_channels={t.caption_channels}; use the T5 it was trained with.")
        if self.vae.temporal_vae.post_quant_conv.conv.in_channels != t.in_channels:
            raise VpoError(f"VAE {c.vae!r} has {self.vae.temporal_vae.post_quant_conv.conv.in_channels} latent "
                           f"channels but STDiT3 {c.model!r} takes in_channels={t.in_channels}.")
        if min(c.height, c.width) < self.spatial_factor:
            raise VpoError(f"height x width {c.height}x{c.width} is smaller than the VAE's x{self.spatial_factor}.")

    # ------------------------------------------------------------------------------------------- setup
    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.spatial_vae.module.config.block_out_channels) - 1)

    @property
    def latent_frames(self) -> int:
        return self.vae.latent_frames(self.config.num_frames)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T', h, w)``: one row's noise in the original's layout."""
        c, f = self.config, self.spatial_factor
        return self.transformer.config.in_channels, self.latent_frames, c.height // f, c.width // f

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device: torch.device) -> "OpenSoraPolicy":
        self.device = torch.device(device)
        for module in (self.transformer, self.vae, self.text_encoder, self.trainable.reference_copy):
            if module is not None:
                module.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 features ``[B, L, D]`` and token masks ``[B, L]`` of the prepared prompts (suffix, cleaning), padded
        to the transformer's ``model_max_length``; cached per prompt (LRU of ``text_cache_size``)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        encoded = {}
        if missing:
            c = self.config
            tokens = self.tokenizer([prepare_prompt(p, c.aesthetic_score, c.motion_score) for p in missing],
                                    max_length=self.transformer.config.model_max_length, padding="max_length",
                                    truncation=True, add_special_tokens=True, return_tensors="pt")
            ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            features = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            encoded = {p: (features[i], mask[i]) for i, p in enumerate(missing)}
        rows = []
        for prompt in prompts:
            row = encoded.get(prompt)
            if row is None:
                row = self._text_cache[prompt]
                self._text_cache.move_to_end(prompt)
            rows.append(row)
        if self.config.text_cache_size:
            self._text_cache.update(encoded)
            while len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]).to(self.dtype), torch.stack([r[1] for r in rows])

    # ------------------------------------------------------------------------------------------- model
    def transform_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Open-Sora v1.2's timestep transform at this policy's size (float32, in [0, 1000])."""
        c = self.config
        ratio_space = (torch.tensor(float(c.height * c.width)) / (512 * 512)).sqrt()
        ratio_time = torch.tensor(1.0 if c.num_frames == 1 else float(c.num_frames // 17 * 5)).sqrt()
        ratio = ratio_space * ratio_time
        u = timesteps.float().cpu() / 1000
        return (ratio * u / (1 + (ratio - 1) * u) * 1000).to(timesteps.device)

    def timesteps(self) -> torch.Tensor:
        """The sampling timesteps ``[N]`` (transformed, float32, on the CPU); the chain ends at t = 0."""
        steps = self.config.num_inference_steps
        return self.transform_timesteps(torch.tensor([(1.0 - i / steps) * 1000 for i in range(steps)]))

    def _conditioning(self, rows: int) -> dict[str, torch.Tensor]:
        c = self.config
        fps = IMAGE_FPS if c.num_frames == 1 else c.fps
        return {name: torch.full((rows,), float(value), device=self.device)
                for name, value in (("fps", fps), ("height", c.height), ("width", c.width))}

    def _velocity(self, latents: torch.Tensor, timesteps: torch.Tensor, caption: torch.Tensor, mask: torch.Tensor,
                  guidance: bool) -> torch.Tensor:
        """Open-Sora's velocity ``x0 - noise`` ``[B, T', C, h, w]`` (float32), guided when ``guidance``."""
        x = latents.permute(0, 2, 1, 3, 4)
        timesteps = timesteps.to(self.device, torch.float32)
        if guidance:  # text rows first, null-caption rows second, masked with the prompt's own token mask
            x, timesteps = torch.cat([x, x]), torch.cat([timesteps, timesteps])
            caption = torch.cat([caption, self.transformer.null_caption(caption.shape[0]).to(caption.dtype)])
            mask = torch.cat([mask, mask])
        channels = latents.shape[2]
        out = self.trainable.forward_module(x.to(self.dtype), timesteps, caption, mask,
                                            **self._conditioning(x.shape[0]))[:, :channels]
        if guidance:
            text, null = out.chunk(2)
            out = null + self.config.guidance_scale * (text - null)
        return out.permute(0, 2, 1, 3, 4)

    @property
    def _guided(self) -> bool:
        return self.config.guidance_scale > 1.0

    @staticmethod
    def _euler(latents: torch.Tensor, velocity: torch.Tensor, timesteps: torch.Tensor, i: int) -> torch.Tensor:
        after = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros(())
        return latents + velocity * ((timesteps[i] - after) / 1000).to(latents.device)

    def _initial_noise(self, generators: list[torch.Generator]) -> torch.Tensor:
        return randn_rows(self.latent_shape, generators, self.device).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------------------------------- sampling
    def _grad_steps(self, window: GradientWindow | None, seeds: list[int]) -> int:
        if window is None:
            return 0
        last = max(1, min(int(window.last_steps), self.config.num_inference_steps))
        if window.random_cutoff:  # one draw per call from the rows' seeds: the rollout stays reproducible
            generator = torch.Generator().manual_seed(derive_seed("cutoff", *[int(s) for s in seeds]))
            last = int(torch.randint(1, last + 1, (1,), generator=generator))
        return last

    def _check_rows(self, prompts: list[str], seeds: list[int]) -> None:
        if len(prompts) != len(seeds):
            raise VpoError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per row.")

    def sample(self, prompts: list[str], seeds: list[int], *, decode: bool = True,
               gradient: GradientWindow | None = None) -> Rollout:
        """One video per (prompt, seed) row, ``micro_batch_size`` rows denoised together."""
        self._check_rows(prompts, seeds)
        grad_steps = self._grad_steps(gradient, seeds)
        with self.eval_mode():
            latents = torch.cat([self._sample_rows(prompts[rows], seeds[rows], grad_steps, gradient)
                                 for rows in iter_chunks(len(prompts), self.config.micro_batch_size)])
        frames = self._decode_rows(latents) if decode and gradient is None else None
        return Rollout(latents=latents, prompts=list(prompts), seeds=list(seeds), frames=frames,
                       extras={"grad_steps": grad_steps})

    def _sample_rows(self, prompts, seeds, grad_steps: int, window: GradientWindow | None) -> torch.Tensor:
        caption, mask = self.embed_prompts(prompts)
        latents = self._initial_noise(row_generators(seeds))
        timesteps = self.timesteps()
        first_grad_step = len(timesteps) - grad_steps
        module = self.trainable.module
        toggled = False
        for i, t in enumerate(timesteps):
            with_grad = i >= first_grad_step
            if with_grad and window.checkpointing and not module.is_gradient_checkpointing:
                module.enable_gradient_checkpointing()
                toggled = True
            with torch.set_grad_enabled(with_grad):
                velocity = self._velocity(latents, t.expand(len(prompts)), caption, mask, self._guided)
                latents = self._euler(latents, velocity, timesteps, i)
        if toggled:
            module.disable_gradient_checkpointing()
        return latents

    def _decode_rows(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.decode(latents[rows])
                              for rows in iter_chunks(latents.shape[0], self.config.micro_batch_size)])

    # ------------------------------------------------------------------------------------------- trajectories
    def _sigma_max(self, timesteps: torch.Tensor) -> float:
        """The schedule's first sigma below 1 (Flow-GRPO's stand-in for sigma = 1 in the std formula)."""
        below = [float(t) / 1000 for t in timesteps if float(t) < 1000]
        return below[0] if below else 0.0

    def _sde_step(self, latents, velocity, sigma, sigma_next, noise_level, sigma_max):
        # Open-Sora's sigma is t/1000 with x_t = (1 - sigma) x0 + sigma noise, diffusers' flow convention; its
        # velocity x0 - noise is the negative of diffusers' noise - x0.
        return flow_sde_step(latents, -velocity, sigma, sigma_next, noise_level, sigma_max)

    @torch.no_grad()
    def sample_trajectory(self, prompts: list[str], seeds: list[int], settings: TrajectorySettings, *,
                          decode: bool = True) -> Trajectory:
        """``sample``'s chain with Flow-GRPO's SDE step at the steps of ``settings.window`` (all when None)."""
        self._check_rows(prompts, seeds)
        timesteps = self.timesteps()
        count = len(timesteps)
        start, end = settings.window if settings.window is not None else (0, count)
        steps = list(range(max(0, start), min(count, end)))
        sigmas = torch.cat([timesteps / 1000, torch.zeros(1)])
        sigma_max = self._sigma_max(timesteps)
        chains, log_probs = [], []
        with self.eval_mode():
            for rows in iter_chunks(len(prompts), self.config.micro_batch_size):
                caption, mask = self.embed_prompts(prompts[rows])
                generators = row_generators(seeds[rows])
                latents = self._initial_noise(generators)
                states, row_log_probs = [latents], torch.full((latents.shape[0], count), float("nan"))
                for i, t in enumerate(timesteps):
                    velocity = self._velocity(latents, t.expand(latents.shape[0]), caption, mask, self._guided)
                    if i in steps:  # every std is > 0: sigma_next < sigma and sigma > 0 at every step
                        mean, std = self._sde_step(latents, velocity, sigmas[i], sigmas[i + 1], settings.noise_level,
                                                   sigma_max)
                        latents, log_prob = stochastic_step(mean, std, generators, torch.float32)
                        row_log_probs[:, i] = log_prob.cpu()
                    else:
                        latents = self._euler(latents, velocity, timesteps, i)
                    states.append(latents)
                chains.append(torch.stack(states, dim=1))
                log_probs.append(row_log_probs)
        chain = torch.cat(chains)
        frames = self._decode_rows(chain[:, -1]) if decode else None
        return Trajectory(latents=chain, log_probs=torch.cat(log_probs), steps=steps, prompts=list(prompts),
                          seeds=list(seeds), settings=settings, frames=frames,
                          extras={"timesteps": timesteps, "sigmas": sigmas, "sigma_max": sigma_max})

    def transition(self, trajectory: Trajectory, rows: list[int], steps: list[int]) -> Transition:
        """Transitions ``steps[k]`` of rows ``rows[k]`` under the current weights (one batched forward)."""
        if len(rows) != len(steps):
            raise VpoError(f"transition() got {len(rows)} rows but {len(steps)} steps; give one step per row.")
        sigmas = trajectory.extras["sigmas"]
        index = torch.tensor(steps)
        rows_t = torch.tensor(rows)
        latents = trajectory.latents[rows_t, index].to(self.device)
        following = trajectory.latents[rows_t, index + 1].to(self.device)
        caption, mask = self.embed_prompts([trajectory.prompts[r] for r in rows])
        velocity = self._velocity(latents, trajectory.extras["timesteps"][index], caption, mask, self._guided)
        mean, std = self._sde_step(latents, velocity, sigmas[index], sigmas[index + 1],
                                   trajectory.settings.noise_level, trajectory.extras["sigma_max"])
        return Transition(log_prob=gaussian_log_prob(following, mean, std), mean=mean, std=std)

    # ------------------------------------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents ``[B, T', C, h, w]`` -> frames ``[B, T, 3, H, W]`` in [0, 1]; differentiable under grad.

        ``frame_indices`` picks latent frames and decodes them as a clip of their own, as VADER's Open-Sora code
        does: k latent frames give ``17 * (k // 5) + 4 * (k % 5) - 3`` frames (one latent frame: one image).
        """
        if frame_indices is not None:
            latents = latents[:, list(frame_indices)]
        count = latents.shape[1]
        full = frame_indices is None and count == self.latent_frames
        frames = self.config.num_frames if full else self.vae.pixel_frames(count)
        video = self.vae.decode(latents.permute(0, 2, 1, 3, 4).to(self.device, self.vae.dtype), frames)
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` in [0, 1] -> latents ``[B, T', C, h, w]`` (posterior means)."""
        video = (frames.to(self.device, self.vae.dtype) * 2 - 1).permute(0, 2, 1, 3, 4)
        return self.vae.encode(video).float().permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Open-Sora's training distribution: ``sigmoid(N(0, 1)) * 1000``, transformed at the policy's size."""
        u = torch.sigmoid(torch.randn(batch_size, generator=generator, device=generator.device))
        return self.transform_timesteps(u.float() * 1000).to(self.device)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(latents.device, latents.dtype)

    def denoising_loss(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """Per-sample rectified-flow loss ``[B]``: mean of ``(v(x_t, t) - (x0 - noise))^2`` over all non-batch dims."""
        x0 = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device, torch.float32)
        keep = (1 - timesteps / 1000).view(-1, *[1] * (x0.dim() - 1))
        noisy = keep * x0 + (1 - keep) * noise
        caption, mask = self.embed_prompts(list(prompts))
        prediction = self._velocity(noisy, timesteps, caption, mask, guidance=False)
        return (prediction - (x0 - noise)).pow(2).flatten(1).mean(dim=1)

    # ------------------------------------------------------------------------------------------- reference
    # ------------------------------------------------------------------------------------------- checkpoints
    def load_adapter(self, directory: str | Path) -> None:
        """Load a LoRA adapter written by ``save_pretrained`` (same rank, alpha and targets as ``lora:``) into the
        learner, e.g. to sample with a tuned policy."""
        import json

        from safetensors.torch import load_file

        directory = Path(directory)
        path, config_path = directory / "adapter_model.safetensors", directory / "adapter_config.json"
        if self.config.full_finetune or not path.is_file() or not config_path.is_file():
            raise VpoError(f"{directory} holds no peft adapter (adapter_model.safetensors + adapter_config.json) for "
                           "this LoRA policy; a full fine-tune is loaded with `model: DIR` instead.")
        saved, lora = json.loads(config_path.read_text()), self.config.lora
        if (saved.get("r"), float(saved.get("lora_alpha", 0))) != (lora.rank, float(lora.alpha)):
            raise VpoError(f"{config_path}: rank {saved.get('r')} / alpha {saved.get('lora_alpha')}, but the policy's "
                           f"lora: is rank {lora.rank} / alpha {lora.alpha}; set lora: to match the adapter.")
        weights = {k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.")
                   .replace(".lora_B.", ".lora_B.default."): v for k, v in load_file(str(path)).items()}
        parameters = dict(self.transformer.named_parameters())
        learner = {n for n in parameters if ".lora_" in n and ".default." in n}
        bad = sorted(set(weights) ^ learner) + sorted(k for k in weights if k in parameters
                                                      and parameters[k].shape != weights[k].shape)
        if bad:
            raise VpoError(f"{path} does not fit this policy's LoRA layers ({len(bad)} mismatches, e.g. {bad[:2]}); "
                           "use the lora.target_modules it was trained with.")
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)

    def save_pretrained(self, directory: Path) -> None:
        """LoRA: a peft adapter (``adapter_model.safetensors`` + ``adapter_config.json``) for
        ``peft.PeftModel.from_pretrained(STDiT3.from_pretrained(...), directory)``. Full fine-tuning: STDiT3 in the
        published layout (``config.json`` + ``model.safetensors``), usable as ``model:`` in a spec."""
        if self.config.full_finetune:
            self.transformer.save_pretrained(directory)
        else:
            self.trainable.save_peft_adapter(directory)
