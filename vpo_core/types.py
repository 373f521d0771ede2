"""The contract between the core and plugins (import it from ``vpo_core``).

Four kinds of parts exist: policies, rewards, pair selectors and objectives. A plugin registers each with a
factory ``factory(config, context) -> part`` and a pydantic config model. What the core must know before any
model loads is declared once, on the config model's base class: what an objective requires, which score keys a
selector or objective reads, which dimensions a reward scores and whether it is differentiable, which optional
capabilities a policy has. ``vpo validate`` checks a spec with these alone.

Tensor conventions: frames ``[B, T, C, H, W]`` float in [0, 1] (RGB); latents batch first, in the policy's own
layout; scores ``{"<reward name>.<dimension>": Tensor[B]}``, higher is better. This module does not import torch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported when a part is built, not when plugins or specs are read
    import torch

    from .adapters import TrainableModule


# ----------------------------------------------------------------------------------------------- configs
class PartConfig(BaseModel):
    """Base of every part's config model: unknown keys are errors. The core strips its own keys (``type``;
    a reward's ``name``, ``weight``, ``timeout_s``) and validates the rest of the section with the model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PolicyConfig(PartConfig):
    """``capabilities``: optional parts of the contract the policy implements. ``"trajectories"``:
    ``sample_trajectory`` and ``transition`` (GRPO)."""

    capabilities: ClassVar[frozenset[str]] = frozenset()


class RewardConfig(PartConfig):
    differentiable: ClassVar[bool] = False  # score() keeps a graph to the frames (needed by reward gradients)

    def score_dimensions(self) -> list[str]:
        """The dimensions ``score`` returns with this config."""
        raise NotImplementedError(f"{type(self).__name__} does not declare score_dimensions()")


class SelectorConfig(PartConfig):
    def score_keys(self) -> list[str]:
        """Score keys (``"<reward>.<dimension>"`` or ``"total"``) the selector reads."""
        return []


class ObjectiveConfig(PartConfig):
    # "pairs": PairBatch (online: sampled + selected each step; offline: ``data.pairs``); "rollout": PromptBatch,
    # the objective samples with a GradientWindow; "trajectories": TrajectoryBatch (GRPO).
    requires: ClassVar[Literal["pairs", "rollout", "trajectories"]] = "pairs"

    def score_keys(self) -> list[str]:
        return []

    def updates_per_batch(self) -> int:
        """Optimizer updates made from each collected batch (GRPO's inner epochs; 1 elsewhere)."""
        return 1


class LoraSpec(BaseModel):
    """``lora:`` section of a policy config; plugins subclass it to set their default ``target_modules``."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Module names (or name suffixes, as peft matches them) that get an adapter.
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v"])


@dataclass
class BuildContext:
    """What a factory gets besides its own config."""

    device: torch.device
    seed: int
    output_dir: Path | None = None
    mixed_precision: str = "no"  # "no", "fp16", "bf16": policies may cast frozen parts to it
    # Opt-ins from the spec's ``safety`` section. Loading code must refuse pickles / remote code unless set.
    allow_pickle: bool = False
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------------------------- policies
@dataclass
class GradientWindow:
    """Which denoising steps of a rollout carry gradient (truncated back-propagation, VADER style): the last
    ``last_steps``; with ``random_cutoff`` a number in [1, last_steps] drawn from the rows' seeds;
    ``checkpointing`` recomputes the window's activations in the backward pass."""

    last_steps: int = 1
    random_cutoff: bool = False
    checkpointing: bool = True


@dataclass
class Rollout:
    """Result of ``Policy.sample``; row ``i`` belongs to ``prompts[i]`` and ``seeds[i]``."""

    latents: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    frames: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrajectorySettings:
    """How ``Policy.sample_trajectory`` samples: Gaussian transitions whose log-density is recorded."""

    noise_level: float = 0.7  # flow models: Flow-GRPO's noise level; DDIM (eps / v) models: eta
    # Stochastic steps [start, end) (MixGRPO / Flow-GRPO-Fast); deterministic (ODE / eta 0) elsewhere. None: all.
    window: tuple[int, int] | None = None


@dataclass
class Trajectory:
    """A recorded denoising chain; row ``i`` belongs to ``prompts[i]`` and ``seeds[i]``."""

    latents: torch.Tensor  # [B, S+1, ...]: the initial noise (index 0) ... the final latents (index S)
    log_probs: torch.Tensor  # [B, S] float32 log-density of each transition when sampled; NaN where deterministic
    steps: list[int]  # indices of the stochastic transitions (the ones GRPO can train)
    prompts: list[str]
    seeds: list[int]
    settings: TrajectorySettings
    frames: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Transition:
    """Gaussian transitions ``latents[row, step] -> latents[row, step + 1]`` re-evaluated under some weights."""

    log_prob: torch.Tensor  # [K] float32, averaged over the non-batch dims
    mean: torch.Tensor  # [K, ...] float32
    std: torch.Tensor  # [K] float32


@runtime_checkable
class Policy(Protocol):
    """The video model being tuned. ``trainable`` holds the module the optimizer updates; every training
    forward pass goes through ``trainable.forward_module`` so the loop can wrap it (DDP / FSDP2)."""

    trainable: TrainableModule

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def sample(self, prompts: list[str], seeds: list[int], *, decode: bool = True,
               gradient: GradientWindow | None = None) -> Rollout:
        """One video per (prompt, seed) row, reproducible from its seed alone, whatever the batch. Without a
        ``gradient`` window nothing keeps a graph; with one, the last steps do (through the trainable weights
        only) and frames are not decoded (call ``decode``)."""

    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents -> frames in [0, 1]; ``frame_indices`` selects latent frames. Differentiable under grad."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames -> latents (training on stored videos)."""

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps from the model's own training distribution."""

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def denoising_loss(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``[B]`` in the model's own parameterisation, averaged over all non-batch dims."""

    def use_reference(self) -> contextlib.AbstractContextManager[None]:
        """Forward passes inside use the reference (adapters disabled, the reference adapter, or a frozen copy)."""

    def update_reference(self) -> None:
        """Reference := the current policy (curriculum update)."""

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_pretrained(self, directory: Path) -> None:
        """The tuned weights in the model's ecosystem format (a diffusers LoRA for diffusers models)."""

    def train(self, mode: bool = True) -> Any: ...

    # Capability "trajectories" (declared in PolicyConfig.capabilities):
    #   sample_trajectory(prompts, seeds, settings: TrajectorySettings, *, decode=True) -> Trajectory
    #       one stochastic chain per (prompt, seed), reproducible from the seed alone, no graph.
    #   transition(trajectory, rows: list[int], steps: list[int]) -> Transition
    #       re-evaluates transition steps[k] of row rows[k] (same guidance as sampling) under the current weights,
    #       with a graph when grad is enabled, or under the reference inside ``use_reference()``.


class TrainablePolicy:
    """Policy methods that only forward to ``self.trainable`` (a policy sets it in ``__init__``): the optimizer's
    parameters, the reference, checkpoints, train mode (sample inside ``eval_mode()``)."""

    trainable: TrainableModule

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.trainable.parameters()

    @property
    def has_reference_adapter(self) -> bool:
        return self.trainable.has_reference_adapter

    def use_reference(self) -> contextlib.AbstractContextManager[None]:
        """Forward passes inside use the reference: base weights, the "reference" adapter, or the frozen copy."""
        return self.trainable.use_reference()

    def update_reference(self) -> None:
        """Reference := the current policy (one extra LoRA adapter, or the frozen copy with full fine-tuning)."""
        self.trainable.update_reference()

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return self.trainable.state_dict()

    def load_state_dict_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        self.trainable.load_state_dict(state, f"{type(self).__name__}")

    def train(self, mode: bool = True) -> "TrainablePolicy":
        self.trainable.train(mode)
        return self

    def eval_mode(self) -> contextlib.AbstractContextManager[None]:
        """Eval mode inside, the previous mode after (sampling without dropout draws)."""
        return self.trainable.eval_mode()


# ----------------------------------------------------------------------------------------------- rewards
@runtime_checkable
class Reward(Protocol):
    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """frames -> ``{dimension: Tensor[B]}`` for the config's ``score_dimensions()``: finite, or NaN for a
        video it cannot score; keeps the graph when the config is ``differentiable``. Any device."""


# ----------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Pair:
    """One preference pair among the candidates of prompt ``prompt_index`` (indices into the N candidates)."""

    prompt_index: int
    winner: int
    loser: int
    weight: float = 1.0
    margin: float = 0.0


@runtime_checkable
class PairSelector(Protocol):
    def select(self, scores: dict[str, torch.Tensor]) -> list[Pair]:
        """``scores[key]`` is ``[P, N]`` (prompts x candidates). Return the pairs to train on (maybe none)."""


class Batch:
    """What an objective trains on; the loop splits it into chunks of rows (``train.pair_batch_size``)."""

    def __len__(self) -> int:
        return len(self.prompts)  # type: ignore[attr-defined]

    def take(self, index: slice) -> "Batch":
        return replace(self, **{k: v[index] for k, v in vars(self).items() if v is not None})


@dataclass
class PairBatch(Batch):
    """Winner and loser latents of pairs, their prompts, weights ``[B]``, and a seed per pair for the
    objective's noise and timesteps (so a pair's draw does not depend on how pairs are batched)."""

    winner_latents: torch.Tensor
    loser_latents: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor
    margins: torch.Tensor | None = None
    seeds: list[int] | None = None


@dataclass
class PromptBatch(Batch):
    """Prompts (one rollout each) for reward-gradient objectives, with a seed per row."""

    prompts: list[str]
    seeds: list[int]


@dataclass
class TrajectoryBatch(Batch):
    """G recorded chains per prompt (this process's rows, prompt-major) with their scores; ``groups[i]`` is row
    i's prompt index among the micro-step's prompts, and ``step_scores`` holds every process's scores ``[P, G]``
    (for statistics over the whole step). ``Objective.expand`` turns it into the transitions to train on."""

    trajectory: Trajectory
    prompts: list[str]
    scores: dict[str, torch.Tensor]
    groups: list[int]
    step_scores: dict[str, torch.Tensor]


@dataclass
class TransitionBatch(Batch):
    """Transitions ``(rows[k], steps[k])`` of one recorded trajectory with a per-transition advantage."""

    trajectory: Trajectory
    rows: list[int]
    steps: list[int]
    advantages: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: slice) -> "TransitionBatch":
        return replace(self, rows=self.rows[index], steps=self.steps[index], advantages=self.advantages[index])


ScoreFn = Callable[["torch.Tensor", list[str]], dict[str, "torch.Tensor"]]


@dataclass
class StepContext:
    """What an objective gets each micro-step: the step, a generator for choices shared by the whole micro-step
    (seeded by (seed, step, micro-step), the same on every process), and the spec's rewards as one function
    returning every score key plus ``total``, differentiable where the rewards are."""

    step: int
    generator: torch.Generator
    score: ScoreFn
    update: int = 0  # which of ObjectiveConfig.updates_per_batch() updates this is


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # mean over the batch's rows
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scores of rollouts, for logging


class Objective:
    """Base class of objectives: ``loss`` is required, the rest are optional hooks with these defaults."""

    def loss(self, policy: Policy, batch: Any, ctx: StepContext) -> ObjectiveOutput:
        raise NotImplementedError

    def after_optimizer_step(self, step: int, policy: Policy) -> dict[str, float]:
        """After every optimizer step that changed the weights (curriculum reference updates live here)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def open_pair_dataset(self, path: str, format: str, policy: Policy) -> Any:
        """A reader for pair layouts other than vpo's own (``data.pairs_format``); None: not understood."""
        return None

    def trajectory_settings(self) -> TrajectorySettings:
        """How the loop samples for an objective that requires trajectories."""
        return TrajectorySettings()

    def expand(self, batch: Any, ctx: StepContext) -> Any:
        """The rows to train on, made from a collected batch before it is split into chunks (GRPO: the
        transitions of each trajectory with their advantages). Default: the batch itself."""
        return batch


Kind = Literal["policy", "reward", "selector", "objective"]
KINDS: tuple[Kind, ...] = ("policy", "reward", "selector", "objective")
CONFIG_BASES: dict[str, type[PartConfig]] = {"policy": PolicyConfig, "reward": RewardConfig,
                                             "selector": SelectorConfig, "objective": ObjectiveConfig}


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, n)`` into chunks of at most ``size`` (micro-batching helper for plugins)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
