"""VideoCrafter2 (LVDM) as a vpo policy: our LVDM UNet, diffusers' AutoencoderKL, OpenCLIP's text tower as a
transformers CLIPTextModel, and LVDM's DDIM sampler with its scale trick.

Layouts: latents are ``[B, F, C, H, W]`` (frames second, as the other policies; the UNet itself takes LVDM's
``[B, C, T, H, W]``) scaled by the VAE's 0.18215, float32; frames are ``[B, T, C, H, W]`` in [0, 1]. The VAE is 2D,
so latent frame j decodes to pixel frame j.

Sampling follows AILab-CVC/VideoCrafter's ``lvdm/models/samplers/ddim.py`` as the inference script runs it: "uniform"
DDIM timesteps ``range(0, 1000, 1000 // S) + 1`` (50 steps: 981, 961, ..., 1), the last step going to alpha-bar[0]
(not 1), eta 1 by default, classifier-free guidance ``e_u + s (e_c - e_u)`` against the embedding of "" (not zeros),
fps conditioning, and the scale trick: the model was trained on ``x_t = sqrt(a_t) scale[t] x0 + sqrt(1 - a_t) eps``
with ``scale`` falling from 1 to 0.7 over the first 400 timesteps, so each step divides the predicted x0 by
``scale[t]`` and multiplies it by the scale of the timestep it steps to (1 at the last step).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from vpo_core import BuildContext, GradientWindow, Rollout, VpoError, iter_chunks
from vpo_core import TrainablePolicy
from vpo_core.adapters import TrainableModule
from vpo_core.sampling import ddim_step, gaussian_log_prob, randn_rows, row_generators, stochastic_step
from vpo_core.types import Trajectory, TrajectorySettings, Transition

from .checkpoint import UNET, build_text_encoder, build_unet, build_vae, load_checkpoint
from .config import VideoCrafter2Config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


class LVDMSchedule:
    """LVDM's noise schedule and scale trick (``configs/inference_t2v_512_v2.0.yaml``: linear_start 0.00085,
    linear_end 0.012, 1000 timesteps, ``use_scale``, ``scale_b`` 0.7; ``mid_step`` 400)."""

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 scale_b: float = 0.7, mid_step: int = 400):
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.timesteps = timesteps
        self.alphas_cumprod = alphas_cumprod.float()  # LVDM keeps its buffers in float32
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().float()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt().float()
        # scale[t] = 1 - (1 - scale_b) t / (mid_step - 1) for t < mid_step, then scale_b
        self.scale = torch.cat([torch.linspace(1.0, scale_b, mid_step, dtype=torch.float64),
                                torch.full((timesteps - mid_step,), scale_b, dtype=torch.float64)]).float()

    def ddim_timesteps(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Descending "uniform" DDIM timesteps and the timestep each one steps to (0 after the last: LVDM's
        ``alphas_prev[0]`` is alpha-bar[0] = 0.99915, not 1). ``1000 // steps`` need not divide 1000, so
        e.g. 30 steps give 31 timesteps, exactly as LVDM."""
        ascending = torch.arange(0, self.timesteps, self.timesteps // steps) + 1
        return ascending.flip(0), torch.cat([ascending[:-1].flip(0), torch.zeros(1, dtype=torch.long)])

    def to(self, device: torch.device) -> "LVDMSchedule":
        for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def build(config: VideoCrafter2Config, context: BuildContext) -> "VideoCrafter2Policy":
    """Factory registered as policy ``videocrafter2``."""
    return VideoCrafter2Policy(config, context)


def _per_row(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1, 1)  # [B] against latents [B, F, C, H, W]


class VideoCrafter2Policy(TrainablePolicy):
    """LoRA (or full) fine-tuning of VideoCrafter2's UNet; the VAE and the text encoder stay frozen."""

    def __init__(self, config: VideoCrafter2Config, context: BuildContext):
        from transformers import AutoTokenizer

        self.config = c = config
        self.device = torch.device(c.device) if c.device else torch.device(context.device)
        frozen_dtype = _DTYPES[c.dtype or _MIXED_PRECISION_DTYPES.get(context.mixed_precision, "float32")]
        state, source = load_checkpoint(c.model, c.revision, context.allow_pickle)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(c.tokenizer)
        except (OSError, ValueError) as error:
            raise VpoError(f"could not load the text tokenizer {c.tokenizer!r} ({error}); `tokenizer` is OpenCLIP "
                           "ViT-H/14's, laion/CLIP-ViT-H-14-laion2B-s32B-b79K (hub id or a local copy)") from None
        self.unet = build_unet(state, source, c.temporal_conv_dropout)
        self.vae = build_vae(state, source)
        self.text_encoder = build_text_encoder(state, source, self.tokenizer)
        del state
        for module in (self.unet, self.vae, self.text_encoder):
            if next(module.parameters()).dtype != frozen_dtype:
                module.to(frozen_dtype)
            module.requires_grad_(False).eval()
        self._check_sizes()
        # LoRA with the reference as disabled adapters / a "reference" adapter, or full fine-tuning with a frozen
        # float32 copy of the UNet as the reference (+5.7 GB).
        self.trainable = TrainableModule(self.unet, None if c.full_finetune else c.lora, context.seed)
        self.unet.gradient_checkpointing = c.gradient_checkpointing
        self.schedule = LVDMSchedule()
        self.timesteps, self.prev_timesteps = self.schedule.ddim_timesteps(c.num_inference_steps)
        self.to(self.device)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------------------------------- setup
    def _check_sizes(self) -> None:
        c = self.config
        self.vae_downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        cell = self.vae_downsampling * self.unet.downsampling
        if c.height % cell or c.width % cell:
            raise VpoError(f"height and width must be multiples of {cell} for this model (VAE x{self.vae_downsampling}"
                           f", UNet x{self.unet.downsampling}), got {c.height}x{c.width}; VideoCrafter2's own: 320x512")
        self.latent_shape = (c.num_frames, self.unet.config.in_channels,
                             c.height // self.vae_downsampling, c.width // self.vae_downsampling)

    def to(self, device: torch.device) -> "VideoCrafter2Policy":
        self.device = torch.device(device)
        for module in (self.unet, self.vae, self.text_encoder, self.trainable.reference_copy):
            if module is not None:
                module.to(self.device)
        self.schedule.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Penultimate-layer OpenCLIP embeddings ``[B, 77, 1024]`` of every token position, cached per prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            tokens = self.tokenizer(new, padding="max_length", truncation=True, return_tensors="pt",
                                    max_length=self.text_encoder.config.max_position_embeddings)
            ids = tokens.input_ids.masked_fill(tokens.attention_mask == 0, 0)  # open_clip.tokenize pads with 0
            hidden = self.text_encoder(input_ids=ids.to(self.device)).last_hidden_state  # causal mask only
            self._text_cache.update(zip(new, hidden))
        rows = torch.stack([self._text_cache[p] for p in prompts])
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        while len(self._text_cache) > self.config.text_cache_size:
            self._text_cache.popitem(last=False)
        return rows

    # ------------------------------------------------------------------------------------------- denoising
    def _eps(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, fps: int,
             guidance: float = 1.0) -> torch.Tensor:
        """Noise prediction for latents ``[B, F, C, H, W]`` (float32), with classifier-free guidance when > 1."""
        x, context = latents.transpose(1, 2), embeds
        if guidance > 1:  # one batched UNet call for LVDM's two (unconditional, conditional)
            uncond = self.embed_prompts([self.config.negative_prompt]).expand_as(embeds)
            x, timesteps, context = torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([uncond, embeds])
        eps = self.trainable.forward_module(x, timesteps, context, torch.full_like(timesteps, fps)).float()
        if guidance > 1:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        return eps.transpose(1, 2)

    def _ddim(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[B]`` of LVDM's DDIM step t -> t_prev (per-row timesteps), with the scale trick."""
        s = self.schedule
        pred_x0 = (x - _per_row(s.sqrt_one_minus_alphas_cumprod[t]) * eps) / _per_row(s.sqrt_alphas_cumprod[t])
        # LVDM: pred_x0 /= scale[t]; x_prev = sqrt(a_prev) * scale[t_prev] * pred_x0 + dir_xt + noise
        pred_x0 = pred_x0 * _per_row(s.scale[t_prev] / s.scale[t])
        return ddim_step(x, pred_x0, eps, s.alphas_cumprod[t], s.alphas_cumprod[t_prev], eta)

    def _denoise(self, prompts: list[str], seeds: list[int], etas: list[float], grad_from: int | None = None,
                 checkpointing: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """LVDM's DDIM loop for one micro-batch; step i draws noise with ``etas[i]`` (0: deterministic, no draw).
        Steps from ``grad_from`` on keep a graph. Returns every state (initial noise first) and the steps'
        log-densities ``[B, S]`` (NaN where deterministic)."""
        generators = row_generators(seeds)
        x = randn_rows(self.latent_shape, generators, self.device)
        embeds = self.embed_prompts(prompts)
        states, log_probs = [x], torch.full((len(seeds), len(self.timesteps)), math.nan)
        unet = self.trainable.module
        previous = unet.gradient_checkpointing
        for i, (t, t_prev) in enumerate(zip(self.timesteps.tolist(), self.prev_timesteps.tolist())):
            with_grad = grad_from is not None and i >= grad_from
            unet.gradient_checkpointing = previous or (with_grad and checkpointing)
            with torch.set_grad_enabled(with_grad):
                t_rows = torch.full((len(seeds),), t, device=self.device, dtype=torch.long)
                eps = self._eps(x, t_rows, embeds, self.config.fps, self.config.guidance_scale)
                mean, std = self._ddim(x, eps, t_rows, torch.full_like(t_rows, t_prev), etas[i])
                if etas[i] > 0:
                    x, log_prob = stochastic_step(mean, std, generators, torch.float32)
                    log_probs[:, i] = log_prob.detach().cpu()
                else:
                    x = mean
            states.append(x)
        unet.gradient_checkpointing = previous
        return states, log_probs

    def _window_steps(self, window: GradientWindow | None, seeds: list[int]) -> int:
        """Steps at the end of the chain that keep a graph (VADER's truncated back-propagation)."""
        if window is None:
            return 0
        steps = max(1, min(int(window.last_steps), len(self.timesteps)))
        if not window.random_cutoff:
            return steps
        from vpo_core import derive_seed

        # one draw per call from the rows' seeds, so that a rollout is reproducible from its seeds
        draw = torch.Generator().manual_seed(derive_seed("cutoff", *[int(seed) for seed in seeds]))
        return int(torch.randint(1, steps + 1, (1,), generator=draw))

    def sample(self, prompts: list[str], seeds: list[int], *, decode: bool = True,
               gradient: GradientWindow | None = None) -> Rollout:
        """One video per (prompt, seed) row, ``micro_batch_size`` rows denoised together; each row's initial noise
        and every step's noise come from ``torch.Generator().manual_seed(seed)``."""
        if len(prompts) != len(seeds):
            raise VpoError(f"sample() got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per row.")
        steps = len(self.timesteps)
        grad_steps = self._window_steps(gradient, seeds)
        etas = [self.config.eta] * steps
        with self.eval_mode():
            latents = torch.cat([
                self._denoise(prompts[rows], seeds[rows], etas, steps - grad_steps if grad_steps else None,
                              gradient is not None and gradient.checkpointing)[0][-1]
                for rows in iter_chunks(len(prompts), self.config.micro_batch_size)])
        frames = None
        if decode and gradient is None:
            with torch.no_grad():
                frames = self.decode(latents)
        return Rollout(latents=latents, prompts=list(prompts), seeds=list(seeds), frames=frames,
                       extras={"grad_steps": grad_steps})

    # ------------------------------------------------------------------------------------------- trajectories
    @torch.no_grad()
    def sample_trajectory(self, prompts: list[str], seeds: list[int], settings: TrajectorySettings, *,
                          decode: bool = True) -> Trajectory:
        """``sample``'s chain with steps inside ``settings.window`` drawn with eta = ``settings.noise_level`` and
        the others deterministic (eta 0). No step of LVDM's schedule has std 0 (the last one goes to
        alpha-bar[0] < 1), so with a noise level > 0 every step of the window is stochastic."""
        if len(prompts) != len(seeds):
            raise VpoError(f"sample_trajectory() got {len(prompts)} prompts but {len(seeds)} seeds.")
        steps = len(self.timesteps)
        start, end = settings.window or (0, steps)
        stochastic = [i for i in range(steps) if start <= i < end and settings.noise_level > 0]
        etas = [settings.noise_level if i in stochastic else 0.0 for i in range(steps)]
        states, log_probs = [], []
        with self.eval_mode():
            for rows in iter_chunks(len(prompts), self.config.micro_batch_size):
                chain, densities = self._denoise(prompts[rows], seeds[rows], etas)
                states.append(torch.stack(chain, dim=1))
                log_probs.append(densities)
        latents = torch.cat(states)
        return Trajectory(latents=latents, log_probs=torch.cat(log_probs), steps=stochastic, prompts=list(prompts),
                          seeds=list(seeds), settings=settings, frames=self.decode(latents[:, -1]) if decode else None,
                          extras={"timesteps": self.timesteps.clone(), "prev_timesteps": self.prev_timesteps.clone()})

    def transition(self, trajectory: Trajectory, rows: list[int], steps: list[int]) -> Transition:
        """Transition ``steps[k]`` of row ``rows[k]`` recomputed under the current weights (the reference inside
        ``use_reference()``): one batched UNet call (x2 with CFG) at each row's own timestep."""
        if len(rows) != len(steps):
            raise VpoError(f"transition() got {len(rows)} rows but {len(steps)} steps; give one step per row.")
        index = torch.as_tensor(steps)
        x = trajectory.latents[rows, index].to(self.device)
        t = trajectory.extras["timesteps"][index].to(self.device)
        t_prev = trajectory.extras["prev_timesteps"][index].to(self.device)
        embeds = self.embed_prompts([trajectory.prompts[row] for row in rows])
        with self.eval_mode():
            eps = self._eps(x, t, embeds, self.config.fps, self.config.guidance_scale)
        mean, std = self._ddim(x, eps, t, t_prev, trajectory.settings.noise_level)
        target = trajectory.latents[rows, index + 1].to(self.device)
        return Transition(log_prob=gaussian_log_prob(target, mean, std), mean=mean, std=std)

    # ------------------------------------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents ``[B, F, C, H, W]`` -> frames ``[B, T, 3, H*8, W*8]`` in [0, 1]; frame by frame (the VAE is 2D),
        ``vae_micro_batch_size`` frames per call; differentiable under grad."""
        if frame_indices is not None:
            latents = latents[:, list(frame_indices)]
        flat = latents.flatten(0, 1).to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        images = torch.cat([self.vae.decode(flat[chunk]).sample
                            for chunk in iter_chunks(len(flat), self.config.vae_micro_batch_size)])
        return (images.float() / 2 + 0.5).clamp(0, 1).unflatten(0, latents.shape[:2])

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, 3, H, W]`` in [0, 1] -> latents ``[B, T, C, H/8, W/8]`` (posterior mean, scaled)."""
        flat = frames.flatten(0, 1).to(self.device, self.vae.dtype) * 2 - 1
        latents = torch.cat([self.vae.encode(flat[chunk]).latent_dist.mode()
                             for chunk in iter_chunks(len(flat), self.config.vae_micro_batch_size)])
        return (latents.float() * self.vae.config.scaling_factor).unflatten(0, frames.shape[:2])

    # ------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.schedule.timesteps, (batch_size,), generator=generator,
                             device=generator.device).to(self.device)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(latents.device)

    def denoising_loss(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """Per-sample eps-prediction MSE ``[B]`` as LVDM trains: ``x_t = sqrt(a_t) scale[t] x0 + sqrt(1 - a_t) eps``
        (the scale trick), target ``eps``, averaged over every non-batch dim."""
        x0 = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        t = timesteps.to(self.device).long()
        s = self.schedule
        noisy = (_per_row(s.sqrt_alphas_cumprod[t] * s.scale[t]) * x0
                 + _per_row(s.sqrt_one_minus_alphas_cumprod[t]) * noise)
        fps = self.config.loss_fps or self.config.fps
        prediction = self._eps(noisy, t, self.embed_prompts(list(prompts)), fps)
        return (prediction - noise).pow(2).flatten(1).mean(dim=1)

    # ------------------------------------------------------------------------------------------- reference
    # ------------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: Path) -> None:
        """LoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` (peft, on our ``LVDMUNet``). Full
        fine-tuning: ``unet.safetensors`` with VideoCrafter's own names (``model.diffusion_model.*``), the entries
        of ``model.ckpt`` it replaces."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.config.full_finetune:
            self.trainable.save_peft_adapter(directory)
            return
        weights = {f"{UNET}{k}": v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
        save_file(weights, str(directory / "unet.safetensors"), metadata={"format": "pt"})
