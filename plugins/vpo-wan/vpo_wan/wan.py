"""Wan 2.1 and 2.2 (Wan-AI/*-Diffusers) as a vpo policy, built on diffusers' WanPipeline.

The sampling loop follows ``WanPipeline.__call__`` step for step (the pipeline's prompt encoding and latent
preparation, the checkpoint's scheduler, two transformer passes for classifier-free guidance, Wan 2.2 A14B's switch
to ``transformer_2`` below ``boundary_ratio`` with ``guidance_scale_2``, TI2V-5B's per-token timesteps), so a row
equals what the stock pipeline makes for that prompt with ``generator=torch.Generator().manual_seed(seed)``. It
differs only in running many rows at once, one generator per row, and keeping a graph in the last steps when asked.

Layouts: latents are frame-first ``[B, F, C, H, W]`` in the transformer's normalised space ((z - mean) / std of the
VAE's per-channel statistics), as every vpo policy; the transformer and the VAE see ``[B, C, F, H, W]``. The
schedulers' updates are element-wise, so the layout does not change a single value.
"""

from __future__ import annotations

import torch
from vpo_core import BuildContext, GradientWindow, VpoError
from vpo_core.diffusers_policy import DiffusersVideoPolicy, load_pipeline_parts
from vpo_core.sampling import flow_sde_step, row_generators

from .config import WanConfig

_EXPERTS = {"all": ["transformer", "transformer_2"], "high_noise": ["transformer"], "low_noise": ["transformer_2"]}


def _frames_last(latents: torch.Tensor) -> torch.Tensor:
    """[B, F, C, H, W] <-> [B, C, F, H, W] (the same permutation both ways)."""
    return latents.permute(0, 2, 1, 3, 4)


# ----------------------------------------------------------------------------------------------- loading
def load_pipeline(model: str, revision: str | None, dtype: torch.dtype, vae_dtype: torch.dtype,
                  trust_remote_code: bool = False):
    """Load a WanPipeline (one transformer, or Wan 2.2 A14B's two experts) from a hub id or a local directory."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    index = {}

    def components(path: str) -> dict:
        index.update(WanPipeline.load_config(path, revision=revision))  # model_index.json
        classes = {
            "transformer": (WanTransformer3DModel, {"torch_dtype": dtype}),
            "vae": (AutoencoderKLWan, {"torch_dtype": vae_dtype}),
            "text_encoder": (UMT5EncoderModel, {"dtype": dtype}),
            "tokenizer": (AutoTokenizer, {"trust_remote_code": trust_remote_code}),
        }
        if (index.get("transformer_2") or [None])[0] is not None:  # Wan 2.2 A14B: the low-noise expert
            classes["transformer_2"] = (WanTransformer3DModel, {"torch_dtype": dtype})
        return classes

    scheduler, parts = load_pipeline_parts(model, revision, kind="Wan", example="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                           schedulers=("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"),
                                           components=components)
    return WanPipeline(scheduler=scheduler, boundary_ratio=index.get("boundary_ratio"),
                       expand_timesteps=index.get("expand_timesteps", False), **parts)


def _sampler(scheduler, choice: str, flow_shift: float | None):
    """The checkpoint's scheduler, or UniPC / flow-matching Euler with the checkpoint's (or the given) flow shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if choice == "checkpoint" and flow_shift is None:
        return scheduler
    shift = flow_shift or scheduler.config.get("flow_shift") or scheduler.config.get("shift") or 1.0
    train_steps = scheduler.config.num_train_timesteps
    if choice == "unipc" or choice == "checkpoint" and isinstance(scheduler, UniPCMultistepScheduler):
        return UniPCMultistepScheduler.from_config(scheduler.config, prediction_type="flow_prediction",
                                                   use_flow_sigmas=True, flow_shift=shift,
                                                   num_train_timesteps=train_steps)
    return FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=train_steps)


def build(config: WanConfig, context: BuildContext) -> "WanPolicy":
    """Factory registered as policy ``wan``."""
    return WanPolicy(config, context)


# ----------------------------------------------------------------------------------------------- policy
class WanPolicy(DiffusersVideoPolicy):
    """The Wan policy: LoRA (or full) fine-tuning of the transformer (or of the chosen Wan 2.2 A14B expert(s));
    VAE and UMT5 stay frozen."""

    kind = "wan"
    denoiser_names = ("transformer", "transformer_2")

    def __init__(self, config: WanConfig, context: BuildContext):
        super().__init__(config, context)
        self.pipe = pipe = load_pipeline(config.model, config.revision, self.frozen_dtype,
                                         getattr(torch, config.vae_dtype), context.trust_remote_code)
        pipe.scheduler = _sampler(pipe.scheduler, config.scheduler, config.flow_shift)
        two_experts = pipe.transformer_2 is not None
        if config.experts != "all" and not two_experts:
            raise VpoError(f"experts: {config.experts} needs a two-expert Wan 2.2 A14B checkpoint, but {config.model!r} "
                           "has one transformer; use experts: all.")
        # Timesteps >= boundary go to `transformer` (high noise), the others to `transformer_2` (as stock).
        ratio = pipe.config.boundary_ratio
        self.boundary = ratio * pipe.scheduler.config.num_train_timesteps if ratio is not None else None
        self.max_sequence_length = config.max_sequence_length
        self._check_shapes()
        trained = [name for name in _EXPERTS[config.experts] if name == "transformer" or two_experts]
        self._setup(pipe, trained, context.seed)
        self.transformer = pipe.transformer

    @property
    def latent_dtype(self) -> torch.dtype:
        return torch.float32  # WanPipeline keeps latents in float32 whatever the transformer's dtype

    def _check_shapes(self) -> None:
        c, pipe = self.config, self.pipe
        ratio = pipe.vae_scale_factor_temporal
        if (c.num_frames - 1) % ratio:
            raise VpoError(f"num_frames={c.num_frames} does not fit this VAE: num_frames - 1 must be divisible by its "
                           f"temporal compression {ratio} (e.g. {4 * ratio + 1}, {20 * ratio + 1}).")
        cell = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        if c.height % cell or c.width % cell:  # the stock pipeline would silently round them down
            raise VpoError(f"height and width must be multiples of {cell} for this model (VAE x patch size), got "
                           f"{c.height}x{c.width}.")

    # ------------------------------------------------------------------------------------------- denoiser
    def _expert(self, timestep: float) -> str:
        return "transformer" if self.boundary is None or timestep >= self.boundary else "transformer_2"

    def _predict(self, name: str, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor):
        """One transformer pass of expert ``name`` on frame-first latents at per-row ``timesteps`` [B]."""
        timestep = timesteps
        if self.pipe.config.expand_timesteps:  # TI2V-5B: one timestep per 2x2 latent patch token, as stock
            frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
            tokens = frames * ((height + 1) // 2) * ((width + 1) // 2)
            timestep = timesteps.float()[:, None].expand(-1, tokens)
        output = self._denoiser(name)(hidden_states=_frames_last(latents).to(self.dtype), timestep=timestep,
                                      encoder_hidden_states=embeds, return_dict=False)[0]
        return _frames_last(output)

    def _guided(self, latents: torch.Tensor, condition, timesteps: torch.Tensor,
                per_row_timesteps: bool = False) -> torch.Tensor:
        """The guided velocity for ``latents`` at per-row ``timesteps`` [B]: rows are routed to their expert, with
        the conditional then the unconditional pass and that expert's guidance scale, as the stock loop.
        ``per_row_timesteps``: the timesteps differ between rows (losses, transitions), so under FSDP2 another
        process's rows may need an expert that none of these rows needs. A trained expert's forward pass is then a
        collective: every process runs, in one order, each trained expert that any process's rows need (on row 0,
        weighted 0, where none of its own does), so the gradients are those of one process."""
        c = self.config
        embeds, negative = condition
        experts = [self._expert(t) for t in timesteps.tolist()]
        names = list(dict.fromkeys(experts))
        if per_row_timesteps and self.trainable.sharded:
            import torch.distributed as dist

            needed = torch.tensor([name in names for name in self.trained], dtype=torch.int32, device=self.device)
            dist.all_reduce(needed, op=dist.ReduceOp.MAX)
            names = [n for n, anywhere in zip(self.trained, needed.tolist()) if anywhere] + \
                [n for n in names if n not in self.trained]
        predictions, order, unneeded = [], [], None
        for name in names:
            rows = [i for i, expert in enumerate(experts) if expert == name]
            index = torch.tensor(rows or [0], device=latents.device)
            x, t = latents[index], timesteps[index]
            prediction = self._predict(name, x, t, embeds[index])
            if negative is not None:
                uncond = self._predict(name, x, t, negative[index])
                scale = c.guidance_scale_2 if name == "transformer_2" and c.guidance_scale_2 is not None \
                    else c.guidance_scale
                prediction = uncond + scale * (prediction - uncond)
            if not rows:  # in the graph with weight 0: zero gradients here, summed with the processes that need it
                unneeded = prediction.sum() * 0
                continue
            predictions.append(prediction)
            order += rows
        out = predictions[0] if len(predictions) == 1 else \
            torch.cat(predictions)[torch.tensor(order, device=latents.device).argsort()]
        return out if unneeded is None else out + unneeded

    # ------------------------------------------------------------------------------------------- sampling
    def _initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        # Float32 noise, row i from generators[i] (randn_tensor with a list), as the stock pipeline.
        c, transformer = self.config, self.pipe.transformer or self.pipe.transformer_2
        latents = self.pipe.prepare_latents(len(generators), transformer.config.in_channels, c.height, c.width,
                                            c.num_frames, torch.float32, self.device, generators)
        return _frames_last(latents)

    def _grad_steps(self, window: GradientWindow | None, seeds: list[int], steps: int) -> int:
        grad_steps = super()._grad_steps(window, seeds, steps)
        if grad_steps:
            self.scheduler.set_timesteps(steps, device=self.device)
            used = {self._expert(t) for t in self.scheduler.timesteps[steps - grad_steps:].tolist()}
            if not used & set(self.trained):
                raise VpoError(f"the gradient window (last {grad_steps} of {steps} steps) only runs {sorted(used)}, "
                               f"which is not trained (experts: {self.config.experts}); train that expert or widen "
                               "the window.")
        return grad_steps

    def _denoise(self, prompts, seeds, grad_steps: int, window: GradientWindow | None) -> torch.Tensor:
        scheduler = self.scheduler
        condition = self._condition(prompts)
        latents = self._initial_latents(row_generators(seeds))
        scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        with self._gradient_window(len(timesteps), grad_steps, window) as with_grad:
            for i, t in enumerate(timesteps):
                with torch.set_grad_enabled(with_grad(i)):
                    velocity = self._guided(latents, condition, t.expand(len(seeds)))
                    latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents

    # ------------------------------------------------------------------------------------------- trajectories
    def _schedule(self) -> dict:
        """The sampler's timesteps and sigmas (diffusers' flow convention x_s = (1 - s) x0 + s noise, v = noise - x0,
        which Wan's transformer predicts). Trajectories step with Flow-GRPO's SDE form of the Euler step on these
        sigmas; with the flow-matching Euler scheduler a deterministic window is exactly ``sample``, with UniPC
        (the checkpoints' default) ``sample`` uses UniPC's multistep update instead."""
        self.scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        sigmas = self.scheduler.sigmas.to(self.device, torch.float32)
        return {"timesteps": self.scheduler.timesteps.clone(), "sigmas": sigmas,
                "sigma_max": float(sigmas[sigmas < 1][0])}

    def _transition_distribution(self, x, condition, steps, noise_level: float, schedule):
        velocity = self._guided(x, condition, schedule["timesteps"][steps], per_row_timesteps=True).float()
        return flow_sde_step(x, velocity, schedule["sigmas"][steps], schedule["sigmas"][steps + 1], noise_level,
                             schedule["sigma_max"])

    # ------------------------------------------------------------------------------------------- VAE
    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inverse_std

    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        # The VAE is causal in time: latent frame 0 decodes to one frame, each later one to 4, so k latent frames
        # decoded as a clip of their own give 4k - 3 frames (k = 1: one frame, decoded like a video's first frame).
        z = _frames_last(latents).to(self.vae.dtype)
        mean, inverse_std = self._latent_statistics(z)
        return self.vae.decode(z / inverse_std + mean, return_dict=False)[0]  # [B, C, T, H, W] in [-1, 1]

    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(video).latent_dist.mode()
        mean, inverse_std = self._latent_statistics(z)
        return _frames_last((z - mean) * inverse_std)

    # ------------------------------------------------------------------------------------------- training
    def _training_sigmas(self) -> torch.Tensor:
        """Wan's training sigmas: the 1000-point grid shifted by ``training_shift`` (5), restricted to the trained
        expert(s)' side of the boundary."""
        steps = self.scheduler.config.num_train_timesteps
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
        shift = self.config.training_shift
        sigmas = shift * grid / (1 + (shift - 1) * grid)
        if self.boundary is not None and len(self.trained) == 1:
            high = sigmas * steps >= self.boundary
            sigmas = sigmas[high] if self.trained == ["transformer"] else sigmas[~high]
        return sigmas.float()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Timesteps ``1000 * sigma`` from Wan's training distribution. The Wan report names the rectified-flow
        objective but not its timestep sampler; the published Wan 2.1/2.2 training code (ModelScope's
        DiffSynth-Studio, ``FlowMatchSFTLoss``) draws sigma uniformly from 1000 linearly spaced values shifted by 5
        (A14B: each expert from its side of the boundary), so the fine-tuning sees the noise levels the model was
        tuned on. Its per-timestep loss weight is not applied: a DPO pair shares its timestep, so the weight would
        only rescale beta per timestep."""
        sigmas = self._training_sigmas()
        index = torch.randint(0, len(sigmas), (batch_size,), generator=generator, device=generator.device)
        return (sigmas[index.cpu()] * self.scheduler.config.num_train_timesteps).to(self.device)

    def denoising_loss(
        self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample flow-matching MSE ``[B]``: x_s = (1 - s) x0 + s noise with s = t / 1000, target v = noise - x0,
        each row through its expert (A14B), without guidance."""
        x0 = latents.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        timesteps = timesteps.to(self.device, torch.float32)
        sigma = (timesteps / self.scheduler.config.num_train_timesteps).view(-1, *[1] * (x0.dim() - 1))
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = self._guided(noisy, (self.embed_prompts(list(prompts)), None), timesteps,
                                  per_row_timesteps=True).float()
        return (prediction - (noise - x0)).pow(2).flatten(1).mean(dim=1)
