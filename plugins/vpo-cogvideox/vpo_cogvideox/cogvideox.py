"""CogVideoX (THUDM/CogVideoX-2b, -5b) as a vpo policy, built on diffusers' CogVideoXPipeline.

Layouts: latents are ``[B, F, C, H, W]`` scaled by the VAE scaling factor (the transformer's space);
frames are ``[B, T, C, H, W]`` in [0, 1]. The sampling loop follows ``CogVideoXPipeline.__call__`` step for
step (same helpers, same order of random draws) so that a row equals what the stock pipeline makes for
that prompt with ``generator=torch.Generator().manual_seed(seed)``; it differs only in running many rows
at once, one generator per row, and keeping a graph in the last steps when asked.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
from vpo_core import BuildContext, GradientWindow, Rollout, VpoError, derive_seed, iter_chunks
from vpo_core.adapters import TrainableModule, sorted_config

from .config import CogVideoXConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")


# ----------------------------------------------------------------------------------------------- loading
def load_pipeline(model: str, revision: str | None, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load the five CogVideoX components from a hub id or a local diffusers-layout directory."""
    import diffusers
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    local = Path(model).expanduser()
    looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local:
        if not local.is_dir():
            raise VpoError(
                f"CogVideoX model directory {model!r} does not exist. Give a hub id such as "
                "'THUDM/CogVideoX-2b' or a directory saved with CogVideoXPipeline.save_pretrained."
            )
        missing = [name for name in _SUBFOLDERS if not (local / name).is_dir()]
        if missing:
            raise VpoError(
                f"{model!r} is not a CogVideoX pipeline in diffusers layout: missing subfolder(s) {missing} "
                f"(expected {list(_SUBFOLDERS)}, as written by CogVideoXPipeline.save_pretrained)."
            )
        model = str(local)

    common = {"revision": revision}
    try:
        scheduler_config = diffusers.CogVideoXDDIMScheduler.load_config(model, subfolder="scheduler", **common)
        scheduler_name = scheduler_config.get("_class_name")
        if scheduler_name not in _SCHEDULERS:
            raise VpoError(f"{model!r}: scheduler {scheduler_name!r} is not a CogVideoX scheduler {_SCHEDULERS}.")
        scheduler = getattr(diffusers, scheduler_name).from_config(scheduler_config)
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            model, subfolder="transformer", torch_dtype=dtype, **common
        )
        vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **common)
        text_encoder = T5EncoderModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(
            model, subfolder="tokenizer", trust_remote_code=trust_remote_code, **common
        )
    except VpoError:
        raise
    except (OSError, ValueError) as error:
        raise VpoError(
            f"could not load CogVideoX from {model!r} (revision {revision!r}): {error}. Expected a hub id such as "
            "'THUDM/CogVideoX-2b' (downloaded or cached) or a local directory with subfolders "
            f"{list(_SUBFOLDERS)}."
        ) from error
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def build(config: CogVideoXConfig, context: BuildContext) -> "CogVideoXPolicy":
    """Factory registered as policy ``cogvideox``."""
    return CogVideoXPolicy(config, context)


# ----------------------------------------------------------------------------------------------- policy
class CogVideoXPolicy:
    """The CogVideoX policy: LoRA (or full) fine-tuning of the transformer; VAE and T5 stay frozen."""

    def __init__(self, config: CogVideoXConfig, context: BuildContext):
        from diffusers import CogVideoXDPMScheduler

        self.config = config
        self.device = torch.device(config.device) if config.device else torch.device(context.device)
        dtype_name = config.dtype or _MIXED_PRECISION_DTYPES.get(context.mixed_precision, "float32")
        frozen_dtype = _DTYPES[dtype_name]
        if config.attention == "xformers" and self.device.type != "cuda":
            raise VpoError(
                f"attention: xformers needs a CUDA device, but the policy runs on {self.device}. "
                "Use attention: sdpa (the default; PyTorch picks its fastest kernel)."
            )

        pipe = load_pipeline(config.model, config.revision, frozen_dtype, context.trust_remote_code)
        self.pipe = pipe
        self.vae, self.text_encoder, self.scheduler = pipe.vae, pipe.text_encoder, pipe.scheduler
        self._is_dpm = isinstance(self.scheduler, CogVideoXDPMScheduler)
        self.max_sequence_length = config.max_sequence_length or pipe.transformer.config.max_text_seq_length
        self._check_shapes()

        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        if config.vae_slicing:
            self.vae.enable_slicing()
        if config.vae_tiling:
            self.vae.enable_tiling()

        self.transformer = transformer = pipe.transformer
        transformer.requires_grad_(False)
        if config.attention == "xformers":
            from .attention import use_xformers

            use_xformers(transformer)
        # LoRA with the reference as disabled adapters / a "reference" adapter, or full fine-tuning with a frozen
        # copy of the base (2B: ~6.8 GB more in float32; 5B: ~22 GB).
        self.trainable = TrainableModule(transformer, None if config.full_finetune else config.lora, context.seed)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.to(self.device)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

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

    def to(self, device: torch.device) -> "CogVideoXPolicy":
        self.device = torch.device(device)
        for module in (self.transformer, self.vae, self.text_encoder, self.trainable.reference_copy):
            if module is not None:
                module.to(self.device)
        return self

    def train(self, mode: bool = True) -> "CogVideoXPolicy":
        self.transformer.train(mode)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable.parameters()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of latents and text embeddings fed to the transformer (as in the stock pipeline)."""
        return self.transformer.dtype

    # ------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """T5 embeddings ``[B, L, D]``, cached per prompt (LRU of ``text_cache_size`` prompts)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        encoded = {}
        if missing:
            embeds, _ = self.pipe.encode_prompt(
                missing,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
                dtype=self.dtype,
            )
            encoded = dict(zip(missing, embeds))
        rows = []
        for prompt in prompts:
            embedding = encoded.get(prompt)
            if embedding is None:
                embedding = self._text_cache[prompt]
                self._text_cache.move_to_end(prompt)
            rows.append(embedding)
        if self.config.text_cache_size:
            for prompt, embedding in encoded.items():
                self._text_cache[prompt] = embedding
            while len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack(rows).to(self.dtype)

    # ------------------------------------------------------------------------------------------- sampling
    def _rotary(self, latent_frames: int, height: int, width: int):
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        return self.pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, self.device)

    def _predict(self, latents, embeds, timestep, rotary) -> torch.Tensor:
        transformer = self.trainable.forward_module
        with transformer.cache_context("cond_uncond"):
            return transformer(
                hidden_states=latents,
                encoder_hidden_states=embeds,
                timestep=timestep,
                image_rotary_emb=rotary,
                return_dict=False,
            )[0]

    def _grad_steps(self, window: GradientWindow | None, seeds: list[int], steps: int) -> int:
        if window is None:
            return 0
        last = max(1, min(int(window.last_steps), steps))
        if window.random_cutoff:
            # One draw per call, from a generator seeded by the rows' seeds: the rollout stays reproducible.
            generator = torch.Generator().manual_seed(derive_seed("cutoff", *[int(s) for s in seeds]))
            last = int(torch.randint(1, last + 1, (1,), generator=generator))
        return last

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        decode: bool = True,
        gradient: GradientWindow | None = None,
    ) -> Rollout:
        """One video per (prompt, seed) row, ``micro_batch_size`` rows denoised together."""
        if len(prompts) != len(seeds):
            raise VpoError(f"sample() got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per row.")
        c = self.config
        grad_steps = self._grad_steps(gradient, seeds, c.num_inference_steps)
        was_training = self.trainable.forward_module.training
        self.trainable.forward_module.eval()  # rows must not depend on dropout draws
        try:
            latents = [
                self._sample_rows(prompts[rows], seeds[rows], grad_steps, gradient)
                for rows in iter_chunks(len(prompts), c.micro_batch_size)
            ]
        finally:
            self.trainable.forward_module.train(was_training)
        latents = torch.cat(latents)
        frames = None
        if decode and gradient is None:
            with torch.no_grad():
                frames = torch.cat(
                    [self.decode(latents[rows]) for rows in iter_chunks(len(prompts), c.micro_batch_size)]
                )
        return Rollout(
            latents=latents,
            prompts=list(prompts),
            seeds=list(seeds),
            frames=frames,
            extras={"grad_steps": grad_steps},
        )

    def _sample_rows(
        self, prompts: list[str], seeds: list[int], grad_steps: int, window: GradientWindow | None
    ) -> torch.Tensor:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        c, pipe, scheduler = self.config, self.pipe, self.scheduler
        cfg = c.guidance_scale > 1.0
        embeds = self.embed_prompts(prompts)
        if cfg:
            negative = self.embed_prompts([c.negative_prompt]).expand_as(embeds)
            embeds = torch.cat([negative, embeds])
        timesteps, steps = retrieve_timesteps(scheduler, c.num_inference_steps, self.device)
        # One CPU generator per row, as the stock pipeline with generator=torch.Generator().manual_seed(seed):
        # randn_tensor draws row i from generators[i], so a row's noise does not depend on its batch.
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        latents = pipe.prepare_latents(
            len(prompts),
            self.transformer.config.in_channels,
            c.num_frames,
            c.height,
            c.width,
            embeds.dtype,
            self.device,
            generators,
        )
        step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
        rotary = self._rotary(latents.size(1), c.height, c.width)
        first_grad_step = len(timesteps) - grad_steps
        toggled_checkpointing = False
        old_pred_original_sample = None  # DPM-solver++ state
        for i, t in enumerate(timesteps):
            with_grad = i >= first_grad_step
            if with_grad and window.checkpointing and not self.trainable.forward_module.is_gradient_checkpointing:
                self.trainable.forward_module.enable_gradient_checkpointing()
                toggled_checkpointing = True
            with torch.set_grad_enabled(with_grad):
                model_input = torch.cat([latents] * 2) if cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                timestep = t.expand(model_input.shape[0])
                noise_pred = self._predict(model_input, embeds, timestep, rotary).float()
                guidance = c.guidance_scale
                if c.use_dynamic_cfg:
                    # The stock pipeline's formula, verbatim (t is a timestep, not a step index).
                    guidance = 1 + c.guidance_scale * (
                        (1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2
                    )
                if cfg:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + guidance * (text - uncond)
                if self._is_dpm:
                    latents, old_pred_original_sample = scheduler.step(
                        noise_pred,
                        old_pred_original_sample,
                        t,
                        timesteps[i - 1] if i > 0 else None,
                        latents,
                        **step_kwargs,
                        return_dict=False,
                    )
                else:
                    latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                latents = latents.to(embeds.dtype)
        if toggled_checkpointing:
            self.trainable.forward_module.disable_gradient_checkpointing()
        return latents

    # ------------------------------------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents ``[B,F,C,H,W]`` -> frames ``[B,T,C,H,W]`` in [0,1]; differentiable under grad.

        ``frame_indices`` picks latent frames and decodes them as a clip of their own. The VAE is causal in
        time and decodes latent frames in pairs, so k latent frames give 4k-3 frames for odd k and 4k for even
        k (k=1: one frame, the "first frame" of a clip), and these are not a slice of the full video's frames.
        """
        if frame_indices is not None:
            latents = latents[:, list(frame_indices)]
        video = self.pipe.decode_latents(latents.to(self.vae.dtype))  # [B, C, T, H, W] in [-1, 1]
        frames = (video.float() / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.denormalize
        return frames.permute(0, 2, 1, 3, 4)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B,T,C,H,W]`` in [0,1] -> latents ``[B,F,C,H,W]`` (posterior mean, scaled)."""
        video = (frames.to(self.device, self.vae.dtype) * 2 - 1).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            posterior = self.vae.encode(video).latent_dist
        latents = posterior.mode() * self.pipe.vae_scaling_factor_image
        return latents.permute(0, 2, 1, 3, 4).to(self.dtype)

    # ------------------------------------------------------------------------------------------- training
    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        high = self.scheduler.config.num_train_timesteps
        return torch.randint(0, high, (batch_size,), generator=generator, device=generator.device).to(self.device)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(latents.device, latents.dtype)

    def denoising_loss(
        self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample v-prediction MSE ``[B]``: x_t = add_noise(x0, noise, t), target = get_velocity(x0, noise, t)."""
        x0 = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device).long()
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        target = self.scheduler.get_velocity(x0, noise, timesteps)
        height = x0.shape[-2] * self.pipe.vae_scale_factor_spatial
        width = x0.shape[-1] * self.pipe.vae_scale_factor_spatial
        prediction = self._predict(
            noisy.to(self.dtype),
            self.embed_prompts(list(prompts)),
            timesteps,
            self._rotary(x0.shape[1], height, width),
        ).float()
        return (prediction - target).pow(2).flatten(1).mean(dim=1)

    # ------------------------------------------------------------------------------------------- reference
    @property
    def has_reference_adapter(self) -> bool:
        return self.trainable.has_reference_adapter

    def use_reference(self):
        """Forward passes inside use the reference: base weights, the "reference" adapter, or the frozen copy."""
        return self.trainable.use_reference()

    def update_reference(self) -> None:
        """Reference := current policy (one extra LoRA adapter, or the frozen copy with full fine-tuning)."""
        self.trainable.update_reference()

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return self.trainable.state_dict()

    def load_state_dict_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        self.trainable.load_state_dict(state, "cogvideox policy")

    def save_pretrained(self, directory: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``CogVideoXPipeline.load_lora_weights(directory)``.
        Full fine-tuning: the transformer in ``directory/transformer`` (diffusers layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.full_finetune:
            self.transformer.save_pretrained(directory / "transformer")
            return
        from diffusers import CogVideoXPipeline
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.transformer, adapter_name="default")
        CogVideoXPipeline.save_lora_weights(
            directory,
            transformer_lora_layers=layers,
            # rank/alpha/targets travel with the file, so alpha != rank loads with the right scale
            transformer_lora_adapter_metadata=sorted_config(self.transformer.peft_config["default"]),
        )
