"""Objective ``reward_gradient`` (VADER, Prabhudesai et al. 2024): sample a video with the policy, keep a graph
only through the last denoising step(s), decode (some) frames, score them with differentiable rewards and
back-propagate the reward loss into the trainable parameters.

Per micro-step, for each row of the PromptBatch:

    latents = policy.sample(prompt, seed, gradient=GradientWindow(K))   # steps before the cutoff: no_grad
    frames  = policy.decode(latents, frame_indices)                     # differentiable
    loss    = sum_key mean_rows loss_key(score_key(frames))
              loss_key = -scale * s              (mode maximize)
                       =  scale * |target - s|   (mode target; VADER's aesthetic loss: 0.1 * |s - 10|)

Frame selection picks *latent* frames (see README "Frames" for how they map to pixel frames).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from vpo_core import BuildContext, GradientWindow, ObjectiveOutput, PartConfig, PromptBatch, RunError, StepContext


class RewardShape(BaseModel):
    """How one score key turns into a loss."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["maximize", "target"] = "maximize"
    target: float = 10.0  # mode target only
    scale: float = Field(1.0, gt=0)


class RewardGradientConfig(PartConfig):
    requires: ClassVar[str] = "rollout"

    # Which denoising steps carry gradient: "last" = the final step only (VADER's default), "last_k" = the
    # final `last_steps` steps, "random" = the final k steps with k uniform in [1, last_steps] per rollout.
    cutoff: Literal["last", "last_k", "random"] = "last"
    last_steps: int = Field(1, ge=1)
    # Latent frames decoded for the rewards: all of them, every n-th (0, n, 2n, ...), or one drawn at random
    # per micro-step (VADER's choice for image rewards such as HPS / aesthetics).
    frames: Literal["all", "every_nth", "one_random"] = "all"
    every_n: int = Field(2, ge=1)
    # {score key: shape}; keys are "<reward name>.<dimension>" or "total" (the spec's weighted sum).
    rewards: dict[str, RewardShape] = Field(default_factory=lambda: {"total": RewardShape()})
    # Recompute the window's activations in the backward pass (GradientWindow.checkpointing).
    gradient_checkpointing: bool = True
    # Keep the saved activations in (pinned) CPU memory until the backward pass: torch's save_on_cpu.
    offload_activations: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "RewardGradientConfig":
        if self.cutoff == "last" and self.last_steps != 1:
            raise ValueError(f"cutoff 'last' keeps the final step only, but last_steps={self.last_steps}; "
                             f"use cutoff 'last_k' (exactly K steps) or 'random' (1..K steps)")
        if not self.rewards:
            raise ValueError("`rewards` is empty; name at least one score key, e.g. {total: {mode: maximize}}")
        return self


class RewardGradientObjective:
    requires = "rollout"

    def __init__(self, config: RewardGradientConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.score_keys = list(config.rewards)  # checked against the rewards' keys by the core before sampling

    def gradient_window(self) -> GradientWindow:
        c = self.config
        return GradientWindow(last_steps=c.last_steps, random_cutoff=c.cutoff == "random",
                              checkpointing=c.gradient_checkpointing)

    def frame_indices(self, latent_frames: int, generator: torch.Generator) -> list[int] | None:
        c = self.config
        if c.frames == "all":
            return None
        if c.frames == "every_nth":
            return list(range(0, latent_frames, c.every_n))
        return [int(torch.randint(0, latent_frames, (1,), generator=generator))]

    def reward_loss(self, scores: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        unknown = [k for k in self.config.rewards if k not in scores]
        if unknown:
            raise RunError(f"objective reward_gradient: score key(s) {unknown} not found; available keys: "
                           f"{sorted(scores)} (keys are '<reward name>.<dimension>' or 'total'); fix "
                           f"`objective.rewards`")
        total, metrics = None, {}
        for key, shape in self.config.rewards.items():
            score = scores[key].float()
            if shape.mode == "maximize":
                per_row = -shape.scale * score
            else:
                per_row = shape.scale * (shape.target - score).abs()
            term = per_row.mean()
            metrics[f"loss/{key}"] = term.item()
            total = term if total is None else total + term
        return total, metrics

    def loss(self, policy, batch: PromptBatch, ctx: StepContext) -> ObjectiveOutput:
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
                   if self.config.offload_activations else contextlib.nullcontext())
        with offload:  # everything that saves tensors for backward: the window's steps, decoder and rewards
            rollout = policy.sample(batch.prompts, batch.seeds, decode=False, gradient=self.gradient_window())
            indices = self.frame_indices(rollout.latents.shape[1], ctx.generator)
            frames = policy.decode(rollout.latents, indices)
            scores = ctx.score(frames, batch.prompts)
            loss, metrics = self.reward_loss(scores)
        metrics["grad_steps"] = float(rollout.extras.get("grad_steps", self.config.last_steps))
        metrics["decoded_frames"] = float(frames.shape[1])
        if indices is not None and len(indices) == 1:
            metrics["frame_index"] = float(indices[0])
        return ObjectiveOutput(loss=loss, metrics=metrics, scores={k: v.detach() for k, v in scores.items()})
