"""What the diffusers text-to-video policies (``cogvideox``, ``wan``) share, written once.

A policy plugin subclasses ``DiffusersVideoPolicy`` and ``DiffusersPolicyConfig``, loads its pipeline
(``load_pipeline_parts``: one loading path for hub ids and local directories, with clear errors) and implements the
model-specific parts:

* ``_denoise(prompts, seeds, grad_steps, window)``: the stock pipeline's denoising loop for one micro-batch;
* ``_decode_video(latents)`` / ``_encode_video(video)``: the VAE in the model's own latent space;
* for trajectories (GRPO): ``_initial_latents(generators)``, ``_schedule()`` and
  ``_transition_distribution(x, condition, step_indices, noise_level, schedule) -> (mean, std)``.

The base class holds the rest: per-row generators and micro-batching, the prompt-embedding cache, the gradient
window (truncated back-propagation with optional checkpointing), decoding of latent-frame subsets, VAE slicing,
the trainable denoiser(s) through ``vpo_core.adapters.TrainableModule``, checkpoints, the stochastic trajectory
loop and its re-evaluated transitions, and a LoRA save whose bytes depend on the weights only.

Latents are frame-first ``[B, F, C, H, W]`` for every policy (so objectives can pick latent frames on dim 1);
frames are ``[B, T, C, H, W]`` in [0, 1]. diffusers is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .errors import VpoError
from .types import (
    BuildContext,
    GradientWindow,
    LoraSpec,
    PolicyConfig,
    Rollout,
    TrainablePolicy,
    Trajectory,
    TrajectorySettings,
    Transition,
    iter_chunks,
)


class _LazyTorch:
    """``torch``, imported on first use: plugin configs import this module when specs are read, and that stays light."""

    def __getattr__(self, name: str):
        import torch as module

        globals()["torch"] = module
        return getattr(module, name)


torch = _LazyTorch()  # the real module after its first use

MIXED_PRECISION_DTYPES = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}
DtypeName = Literal["float32", "float16", "bfloat16"]


class DiffusersPolicyConfig(PolicyConfig):
    """Keys every diffusers policy has; a plugin subclasses it and sets its model's defaults."""

    capabilities: ClassVar[frozenset[str]] = frozenset({"trajectories"})

    model: str  # hub id or a local directory in diffusers layout
    revision: str | None = None
    # Dtype of the frozen parts (text encoder, VAE, base weights under LoRA); None follows the run's mixed_precision.
    dtype: DtypeName | None = None
    device: str | None = None  # None: the run's device
    lora: LoraSpec = Field(default_factory=LoraSpec)
    full_finetune: bool = False  # train every denoiser weight (kept in float32) instead of a LoRA adapter
    gradient_checkpointing: bool = False  # diffusers' per-block checkpointing of the trained denoiser(s)

    num_inference_steps: int = Field(50, ge=1)
    # The model's own defaults are set by the plugin's config.
    guidance_scale: float  # > 1 enables classifier-free guidance
    num_frames: int = Field(ge=1)
    height: int = Field(ge=8)
    width: int = Field(ge=8)
    micro_batch_size: int = Field(1, ge=1)  # rows denoised together (x2 with CFG)
    negative_prompt: str = ""
    max_sequence_length: int | None = Field(None, ge=1)  # text tokens; None: the model's own
    text_cache_size: int = Field(1024, ge=0)  # prompt embeddings kept (LRU); 0 disables the cache
    # Decode the rows of a batch one at a time. "auto": off on CPU (measured faster, bench/sampling.py); on CUDA the
    # first decode is sliced and measures its peak, later batches decode at once when that many fit in free memory.
    vae_slicing: bool | Literal["auto"] = "auto"
    vae_tiling: bool = False  # decode in spatial tiles (large resolutions)

    # Checked here so that `vpo validate` catches them; the policy re-checks against the loaded model.
    size_multiple: ClassVar[int] = 8  # height and width are multiples of it
    temporal_compression: ClassVar[int] = 4  # the VAE's: num_frames - 1 is a multiple of it

    @field_validator("height", "width")
    @classmethod
    def _size_fits(cls, value: int) -> int:
        if value % cls.size_multiple:
            raise ValueError(f"must be divisible by {cls.size_multiple} for this model, got {value}")
        return value

    @model_validator(mode="after")
    def _frames_fit_vae(self):
        ratio = self.temporal_compression
        if (self.num_frames - 1) % ratio:
            raise ValueError(f"num_frames={self.num_frames} does not fit the VAE: num_frames - 1 must be divisible by "
                             f"its temporal compression {ratio} (e.g. {4 * ratio + 1}, {12 * ratio + 1}, "
                             f"{20 * ratio + 1})")
        return self


# ----------------------------------------------------------------------------------------------- loading
def _resolve_model(model: str, subfolders: tuple[str, ...], kind: str, example: str) -> str:
    """A hub id unchanged, or a local directory checked for the diffusers layout (clear errors, no traceback)."""
    local = Path(model).expanduser()
    if not (local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1):
        return model
    if not local.is_dir():
        raise VpoError(f"{kind} model directory {model!r} does not exist. Give a hub id such as {example!r} or a "
                       f"directory saved with the pipeline's save_pretrained.")
    missing = [name for name in subfolders if not (local / name).is_dir()]
    if missing:
        raise VpoError(f"{model!r} is not a {kind} pipeline in diffusers layout: missing subfolder(s) {missing} "
                       f"(expected {list(subfolders)}, as written by the pipeline's save_pretrained).")
    return str(local)


def load_pipeline_parts(model: str, revision: str | None, *, kind: str, example: str, schedulers: tuple[str, ...],
                        components: Callable[[str], dict[str, tuple[Any, dict[str, Any]]]]) -> tuple[Any, dict]:
    """The checkpoint's scheduler (one of ``schedulers``, from its ``scheduler_config.json``) and its components,
    ``{subfolder: cls.from_pretrained(model, subfolder=..., revision=..., **kwargs)}`` for each entry of
    ``components(model)``, from a hub id or a local diffusers-layout directory. The hub's and diffusers' OSError /
    ValueError become one VpoError naming the model and the expected layout."""
    import diffusers

    subfolders = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    model = _resolve_model(model, subfolders, kind, example)
    try:
        config = getattr(diffusers, schedulers[0]).load_config(model, subfolder="scheduler", revision=revision)
        name = config.get("_class_name")
        if name not in schedulers:
            raise VpoError(f"{model!r}: scheduler {name!r} is not one the {kind} policy samples with {schedulers}.")
        parts = {part: cls.from_pretrained(model, subfolder=part, revision=revision, **kwargs)
                 for part, (cls, kwargs) in components(model).items()}
    except (OSError, ValueError) as error:
        raise VpoError(f"could not load {kind} from {model!r} (revision {revision!r}): {error}. Expected a hub id "
                       f"such as {example!r} (downloaded or cached) or a local directory with subfolders "
                       f"{list(subfolders)}.") from error
    return getattr(diffusers, name).from_config(config), parts


def canonical_safetensors(path: Path) -> None:
    """Sort the metadata keys of a safetensors header in place.

    safetensors writes its metadata from a Rust hash map whose order changes from process to process, so a file with
    two metadata keys (a diffusers LoRA: ``format`` and ``lora_adapter_metadata``) differs between two identical runs.
    Only the header is rewritten; the tensors are untouched.
    """
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        metadata = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            raise VpoError(f"{path}: unexpected safetensors header; cannot rewrite it in place")
        file.seek(8)
        file.write(text + b" " * (length - len(text)))  # the same keys and values: the same length


# ----------------------------------------------------------------------------------------------- policy
def _experts(modules: dict):
    """Several denoisers trained as one module (Wan 2.2 A14B's two experts), so that one ``TrainableModule`` (one
    optimizer, one DDP/FSDP wrapper, one reference) holds them: ``forward(name, **inputs)`` runs expert ``name``."""

    class Experts(torch.nn.ModuleDict):
        def forward(self, name: str, **inputs):
            return self[name](**inputs)

    return Experts(modules)


class DiffusersVideoPolicy(TrainablePolicy):
    """Base of the diffusers text-to-video policies (see the module docstring for what a subclass provides)."""

    kind: ClassVar[str] = "diffusers"  # the policy's name in messages
    denoiser_names: ClassVar[tuple[str, ...]] = ("transformer",)

    def __init__(self, config: DiffusersPolicyConfig, context: BuildContext) -> None:
        self.config = config
        self.device = torch.device(config.device) if config.device else torch.device(context.device)
        dtype = config.dtype or MIXED_PRECISION_DTYPES.get(context.mixed_precision, "float32")
        self.frozen_dtype = getattr(torch, dtype)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._decode_bytes: int | None = None  # measured per-row VAE decode peak (CUDA, vae_slicing: auto)

    def _setup(self, pipe, trained: list[str], seed: int) -> None:
        """Freeze the text encoder, the VAE and the denoisers not in ``trained``; make ``trained`` the trainable
        module (LoRA or full fine-tuning, with its reference); move everything to the device."""
        from .adapters import TrainableModule

        self.pipe = pipe
        self.vae, self.text_encoder, self.scheduler = pipe.vae, pipe.text_encoder, pipe.scheduler
        self.denoisers = {n: getattr(pipe, n) for n in self.denoiser_names if getattr(pipe, n, None) is not None}
        for module in (self.vae, self.text_encoder, *self.denoisers.values()):
            module.requires_grad_(False).eval()
        if self.config.vae_tiling:
            self.vae.enable_tiling()
        self.trained = list(trained)
        module = self.denoisers[trained[0]] if len(trained) == 1 else _experts({n: self.denoisers[n] for n in trained})
        self.trainable = TrainableModule(module, None if self.config.full_finetune else self.config.lora, seed)
        if self.config.gradient_checkpointing:
            for name in trained:
                self.denoisers[name].enable_gradient_checkpointing()
        self._dtype = next(iter(self.denoisers.values())).dtype
        self.to(self.device)

    def _denoiser(self, name: str = "transformer"):
        """What a forward pass of denoiser ``name`` calls: the frozen module, or the trainable module (adapter,
        DDP/FSDP wrapper, or the reference inside ``use_reference()``)."""
        if name not in self.trained:
            return self.denoisers[name]
        module = self.trainable.forward_module
        return module if len(self.trained) == 1 else functools.partial(module, name)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the denoiser inputs (as in the stock pipelines), read once after set-up: diffusers' ``dtype``
        walks every module, and sampling asks for it at every denoising step."""
        return self._dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """Dtype the sampler keeps latents in (``encode`` returns it too)."""
        return self.dtype

    def to(self, device: torch.device) -> "DiffusersVideoPolicy":
        self.device = torch.device(device)
        modules = [self.vae, self.text_encoder, *self.denoisers.values(), self.trainable.reference_copy]
        for module in filter(None, modules):
            module.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------- text
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[B, L, D]`` from the pipeline's own ``encode_prompt``, cached per prompt (LRU)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        encoded = {}
        if missing:
            with torch.no_grad():
                embeds, _ = self.pipe.encode_prompt(missing, do_classifier_free_guidance=False,
                                                    max_sequence_length=self.max_sequence_length, device=self.device,
                                                    dtype=self.dtype)
            encoded = dict(zip(missing, embeds))
        rows = []
        for prompt in prompts:
            embedding = encoded.get(prompt)
            if embedding is None:
                embedding = self._text_cache[prompt]
                self._text_cache.move_to_end(prompt)
            rows.append(embedding)
        if self.config.text_cache_size:
            self._text_cache.update(encoded)
            while len(self._text_cache) > self.config.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack(rows).to(self.dtype)

    def _condition(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings and, with classifier-free guidance, the negative prompt's for every row."""
        embeds = self.embed_prompts(list(prompts))
        if self.config.guidance_scale <= 1.0:
            return embeds, None
        return embeds, self.embed_prompts([self.config.negative_prompt]).expand_as(embeds)

    # ------------------------------------------------------------------------------------------- sampling
    def _check_rows(self, prompts: list[str], seeds: list[int]) -> None:
        if len(prompts) != len(seeds):
            raise VpoError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per row.")

    def _grad_steps(self, window: GradientWindow | None, seeds: list[int], steps: int) -> int:
        from .data import derive_seed

        if window is None:
            return 0
        last = max(1, min(int(window.last_steps), steps))
        if window.random_cutoff:
            # One draw per call, from a generator seeded by the rows' seeds: the rollout stays reproducible.
            generator = torch.Generator().manual_seed(derive_seed("cutoff", *[int(s) for s in seeds]))
            last = int(torch.randint(1, last + 1, (1,), generator=generator))
        return last

    @contextlib.contextmanager
    def _gradient_window(self, steps: int, grad_steps: int, window: GradientWindow | None):
        """Yields ``with_grad(i)``: whether step ``i`` keeps a graph (the last ``grad_steps``). Switches on
        per-block checkpointing of the trained denoisers for the window when asked, and off again afterwards."""
        first = steps - grad_steps
        toggled: list[torch.nn.Module] = []

        def with_grad(i: int) -> bool:
            if i >= first and window is not None and window.checkpointing:
                for module in (self.denoisers[n] for n in self.trained):
                    if not module.is_gradient_checkpointing:
                        module.enable_gradient_checkpointing()
                        toggled.append(module)
            return i >= first

        try:
            yield with_grad
        finally:
            for module in toggled:
                module.disable_gradient_checkpointing()

    def sample(self, prompts: list[str], seeds: list[int], *, decode: bool = True,
               gradient: GradientWindow | None = None) -> Rollout:
        """One video per (prompt, seed) row, ``micro_batch_size`` rows denoised together."""
        self._check_rows(prompts, seeds)
        grad_steps = self._grad_steps(gradient, seeds, self.config.num_inference_steps)
        with self.eval_mode():
            latents = torch.cat([self._denoise(prompts[rows], seeds[rows], grad_steps, gradient)
                                 for rows in iter_chunks(len(prompts), self.config.micro_batch_size)])
        frames = self._decode_rows(latents) if decode and gradient is None else None
        return Rollout(latents=latents, prompts=list(prompts), seeds=list(seeds), frames=frames,
                       extras={"grad_steps": grad_steps})

    # ------------------------------------------------------------------------------------------- VAE
    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents ``[B, F, C, H, W]`` -> frames ``[B, T, C, H, W]`` in [0, 1]; differentiable under grad.
        ``frame_indices`` picks latent frames, decoded as a clip of their own (see the plugin's README)."""
        if frame_indices is not None:
            latents = latents[:, list(frame_indices)]
        if self._vae_slicing(latents.shape[0]):
            measure = self._decode_bytes is None and self.device.type == "cuda"
            before = torch.cuda.memory_allocated(self.device) if measure else 0
            videos = [self._decode_video(latents[:1])]
            if measure:  # an upper bound of one row's decode peak (the peak statistic is never reset here)
                self._decode_bytes = torch.cuda.max_memory_allocated(self.device) - before
            video = torch.cat(videos + [self._decode_video(row) for row in latents[1:].split(1)])
        else:
            video = self._decode_video(latents)  # [B, C, T, H, W] in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # VaeImageProcessor.denormalize

    def _vae_slicing(self, rows: int) -> bool:
        setting = self.config.vae_slicing
        if rows == 1 or setting is False:
            return False
        if setting is True or self.device.type != "cuda":
            return setting is True
        if self._decode_bytes is None:
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return rows * self._decode_bytes > 0.9 * free

    def _decode_rows(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.decode(latents[rows])
                              for rows in iter_chunks(len(latents), self.config.micro_batch_size)])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, T, C, H, W]`` in [0, 1] -> latents ``[B, F, C, H, W]`` (VAE posterior mean, normalised)."""
        video = (frames.to(self.device, self.vae.dtype) * 2 - 1).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            return self._encode_video(video).to(self.latent_dtype)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(latents.device, latents.dtype)

    # ------------------------------------------------------------------------------------------- trajectories
    def sample_trajectory(self, prompts: list[str], seeds: list[int], settings: TrajectorySettings, *,
                          decode: bool = True) -> Trajectory:
        """``sample``'s sampler with Gaussian transitions inside ``settings.window``, every state recorded."""
        self._check_rows(prompts, seeds)
        with self.eval_mode(), torch.no_grad():
            parts = [self._trajectory_rows(prompts[rows], seeds[rows], settings)
                     for rows in iter_chunks(len(prompts), self.config.micro_batch_size)]
        latents = torch.cat([part[0] for part in parts])
        frames = self._decode_rows(latents[:, -1]) if decode else None
        return Trajectory(latents=latents, log_probs=torch.cat([part[1] for part in parts]), steps=parts[0][2],
                          prompts=list(prompts), seeds=list(seeds), settings=settings, frames=frames,
                          extras={"schedule": parts[0][3]})

    def _trajectory_rows(self, prompts, seeds, settings: TrajectorySettings):
        from .sampling import row_generators, stochastic_step

        generators = row_generators(seeds)  # the initial noise, then every stochastic step's noise
        condition = self._condition(prompts)
        x = self._initial_latents(generators)
        schedule = self._schedule()
        count = len(schedule["timesteps"])
        start, end = settings.window or (0, count)
        chain, stochastic = [x], []
        log_probs = torch.full((len(seeds), count), float("nan"), device=x.device)
        for i in range(count):
            noise_level = settings.noise_level if start <= i < end else 0.0
            steps = torch.full((len(seeds),), i, device=self.device)
            mean, std = self._transition_distribution(x, condition, steps, noise_level, schedule)
            if noise_level > 0 and bool((std > 0).all()):
                x, log_probs[:, i] = stochastic_step(mean, std, generators, x.dtype)
                stochastic.append(i)
            else:  # the deterministic step (ODE / eta 0), also where std is 0 (DDIM's last step into alpha-bar 1)
                x = mean.to(x.dtype)
            chain.append(x)
        return torch.stack(chain, 1), log_probs, stochastic, schedule

    def transition(self, trajectory: Trajectory, rows: list[int], steps: list[int]) -> Transition:
        """Transition ``steps[k]`` of row ``rows[k]`` under the current weights (or the reference inside
        ``use_reference()``), in one batched forward; a graph when grad is enabled."""
        from .sampling import gaussian_log_prob

        if len(rows) != len(steps):
            raise VpoError(f"transition() got {len(rows)} rows but {len(steps)} steps; give one step per row.")
        row_index, step_index = torch.tensor(rows), torch.tensor(steps)
        x = trajectory.latents[row_index, step_index].to(self.device)
        target = trajectory.latents[row_index, step_index + 1].to(self.device)
        condition = self._condition([trajectory.prompts[r] for r in rows])
        mean, std = self._transition_distribution(x, condition, step_index.to(self.device),
                                                  trajectory.settings.noise_level, trajectory.extras["schedule"])
        return Transition(log_prob=gaussian_log_prob(target, mean, std), mean=mean, std=std)

    # ------------------------------------------------------------------------------------------- reference
    # ------------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def lora_weight_name(name: str) -> str:
        return "pytorch_lora_weights.safetensors" if name == "transformer" else f"pytorch_lora_weights_{name}.safetensors"

    def save_pretrained(self, directory: Path) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (``pytorch_lora_weights_<name>.safetensors`` for a second
        denoiser) for the pipeline's ``load_lora_weights``, with rank/alpha/targets in its metadata so alpha != rank
        loads with the right scale. Full fine-tuning: each trained denoiser in ``directory/<name>`` (diffusers
        layout). Identical weights give identical bytes."""
        from peft.utils import get_peft_model_state_dict

        from .adapters import sorted_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.full_finetune:
            for name in self.trained:
                self.denoisers[name].save_pretrained(directory / name)
            return
        layers = get_peft_model_state_dict(self.trainable.module, adapter_name="default")
        metadata = sorted_config(self.trainable.module.peft_config["default"])
        for name in self.trained:
            if len(self.trained) > 1:  # the experts' keys start with "<name>."
                layers_of = {k[len(name) + 1:]: v for k, v in layers.items() if k.startswith(f"{name}.")}
            else:
                layers_of = layers
            type(self.pipe).save_lora_weights(directory, transformer_lora_layers=layers_of,
                                              weight_name=self.lora_weight_name(name),
                                              transformer_lora_adapter_metadata=metadata)
            canonical_safetensors(directory / self.lora_weight_name(name))

    # ------------------------------------------------------------------------------------------- model-specific
    max_sequence_length: int

    def _denoise(self, prompts, seeds, grad_steps: int, window: GradientWindow | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_video(self, video: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _initial_latents(self, generators: list[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    def _schedule(self) -> dict[str, Any]:
        raise NotImplementedError

    def _transition_distribution(self, x, condition, steps, noise_level: float, schedule):
        raise NotImplementedError
