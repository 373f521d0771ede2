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
import torch
from vpo_core import BuildContext, GradientWindow, Objective, ObjectiveOutput, PromptBatch, RunError, StepContext

from .config import RewardGradientConfig


class RewardGradientObjective(Objective):
    def __init__(self, config: RewardGradientConfig, context: BuildContext | None = None) -> None:
        self.config = config

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
