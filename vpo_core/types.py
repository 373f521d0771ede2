"""The contract between the core and plugins.

Plugins import from here (and from ``vpo_core`` top level) and nothing else of the core's internals.
Four kinds of parts exist: policies, rewards, pair selectors and objectives. Each is built by a factory
``factory(config, context) -> part`` that a plugin registers together with a pydantic config model.

Tensor conventions
------------------
* frames: ``[B, T, C, H, W]`` float in ``[0, 1]`` (C = 3, RGB).
* latents: whatever the policy uses, batch first (``[B, ...]``).
* scores: ``{key: Tensor[B]}`` where ``key`` is ``"<reward name>.<dimension>"``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict


class PartConfig(BaseModel):
    """Base class of every part's config model: unknown keys are errors.

    Subclass it in a plugin; the spec section of the part (minus ``type`` and the core's own keys such as a
    reward's ``name`` and ``weight``) is validated with it.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


@dataclass
class BuildContext:
    """What a factory gets besides its own config."""

    device: torch.device
    seed: int
    output_dir: Path | None = None
    # Mixed precision the run asked for ("no", "fp16", "bf16"); policies may cast frozen parts to it.
    mixed_precision: str = "no"
    # Opt-ins from the spec's ``safety`` section. Loading code must refuse pickles / remote code unless set.
    allow_pickle: bool = False
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------------------------- rollouts
@dataclass
class GradientWindow:
    """Which denoising steps of a rollout carry gradient (truncated back-propagation, VADER style).

    ``last_steps`` = K: the last K steps keep a graph, earlier ones run under ``no_grad``.
    ``random_cutoff``: K is drawn uniformly in ``[1, last_steps]`` with the rollout's generator.
    ``checkpointing``: recompute activations of the window in the backward pass.
    """

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


class PolicyConfig(PartConfig):
    """Base of policy config models. ``capabilities`` names the optional parts of the contract the policy
    implements (so a spec is checked before any model loads): ``"trajectories"`` = ``sample_trajectory`` and
    ``transition`` (GRPO)."""

    capabilities: ClassVar[frozenset[str]] = frozenset()


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
    """The video model being tuned."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates (LoRA weights, or all weights for full fine-tuning)."""

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        decode: bool = True,
        gradient: GradientWindow | None = None,
    ) -> Rollout:
        """One video per (prompt, seed) pair; each row reproducible from its seed alone.

        With ``gradient=None`` everything runs without a graph. With a window, the last steps keep a graph
        through the trainable parameters only; frames are then not decoded (call ``decode``).
        """

    def decode(self, latents: torch.Tensor, frame_indices: list[int] | None = None) -> torch.Tensor:
        """Latents -> frames ``[B,T,C,H,W]`` in [0,1]; ``frame_indices`` selects latent frames to decode.

        Differentiable when called with grad enabled.
        """

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B,T,C,H,W]`` in [0,1] -> latents (used to train on stored videos)."""

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps from the model's own training distribution."""

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise shaped like ``latents`` drawn from ``generator``."""

    def denoising_loss(
        self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample loss ``[B]`` in the model's own parameterisation, averaged over all non-batch dims."""

    def use_reference(self) -> contextlib.AbstractContextManager[None]:
        """Context in which forward passes use the reference model (adapters disabled or reference adapter)."""

    def update_reference(self) -> None:
        """Make the reference equal to the current policy (curriculum update)."""

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Everything trainable or mutable needed to resume (adapter and reference adapter)."""

    def load_state_dict_from_checkpoint(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``state_dict_for_checkpoint``."""

    def save_pretrained(self, directory: Path) -> None:
        """Write the tuned weights in the model's ecosystem format (diffusers LoRA for diffusers models)."""

    def train(self, mode: bool = True) -> Any:
        """Put trainable modules into train/eval mode."""

    # Optional, capability "trajectories" (declare it in the config model's ``capabilities``):
    #   sample_trajectory(prompts, seeds, settings: TrajectorySettings, *, decode=True) -> Trajectory
    #       one stochastic chain per (prompt, seed), reproducible from the seed alone, no graph.
    #   transition(trajectory, rows: list[int], steps: list[int]) -> Transition
    #       re-evaluates transition steps[k] of row rows[k] (same guidance as sampling) under the current weights,
    #       with a graph when grad is enabled, or under the reference inside ``use_reference()``.


# ----------------------------------------------------------------------------------------------- rewards
@runtime_checkable
class Reward(Protocol):
    """A video reward. ``score`` returns one tensor ``[B]`` per dimension, higher is better."""

    dimensions: tuple[str, ...]
    differentiable: bool

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """frames ``[B,T,C,H,W]`` in [0,1] -> ``{dimension: Tensor[B]}``; keeps the graph if differentiable."""


# ----------------------------------------------------------------------------------------------- pairs
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


@dataclass
class PairBatch:
    """Winner and loser latents of a batch of pairs, with their prompts and per-pair weights ``[B]``."""

    winner_latents: torch.Tensor
    loser_latents: torch.Tensor
    prompts: list[str]
    weights: torch.Tensor
    margins: torch.Tensor | None = None


@dataclass
class PromptBatch:
    """Prompts (one rollout each) for reward-gradient objectives, with a seed per row."""

    prompts: list[str]
    seeds: list[int]


ScoreFn = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


@dataclass
class StepContext:
    """What an objective gets each micro-step."""

    step: int
    generator: torch.Generator
    # Scores frames with every reward of the spec: {"<reward>.<dimension>": Tensor[B]} (kept differentiable).
    score: ScoreFn
    # Weighted sum over rewards, as configured in the spec: Tensor[B].
    reward_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # Scores of the rollout for reward-gradient objectives (already detached), for logging and NaN checks.
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Objective(Protocol):
    """Turns a batch into a loss. ``requires`` tells the loop which data to feed.

    * ``"pairs"``: ``loss(policy, PairBatch, ctx)``; pairs come from online sampling + a selector, or from a
      stored pair dataset (``data.pairs`` in the spec).
    * ``"rollout"``: ``loss(policy, PromptBatch, ctx)``; the objective samples with a ``GradientWindow``.
    """

    requires: ClassVar[Literal["pairs", "rollout"]] | Literal["pairs", "rollout"]

    def loss(self, policy: Policy, batch: Any, ctx: StepContext) -> ObjectiveOutput: ...

    def after_optimizer_step(self, step: int, policy: Policy) -> dict[str, float]:
        """Called after each optimizer step with the new step number (curriculum updates live here)."""


Kind = Literal["policy", "reward", "selector", "objective"]
KINDS: tuple[Kind, ...] = ("policy", "reward", "selector", "objective")


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, n)`` into chunks of at most ``size`` (micro-batching helper for plugins)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
