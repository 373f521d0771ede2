"""Objective ``grpo``: group-relative policy optimisation on denoising trajectories.

Each step the loop samples G trajectories per prompt with the policy's stochastic sampler (recording every state
and each transition's log-density) and scores the final videos. Then, per update (``inner_epochs``):

    A_i      = sum_k w_k * clip((r_ik - mean_g(r_k)) / (std(r_k) + 1e-4), -c, c)     group g = i's prompt
    steps_i  = a subset of trajectory i's stochastic steps (timestep_fraction; random or first)
    ratio_it = exp(log p_theta(x_t+1 | x_t) - log p_sample(x_t+1 | x_t))
    loss     = mean_it max(-A_i * ratio_it, -A_i * clip(ratio_it, 1 - eps, 1 + eps))
               + kl_beta * mean_it mean_d (mu_theta - mu_ref)^2 / (2 sigma_t^2)

Log-densities are averaged over the non-batch dims as in DDPO / Flow-GRPO / DanceGRPO, which is why clip ranges
are tiny (1e-4). The KL term is the exact KL between the two Gaussian transitions (same std), per dimension;
Flow-GRPO divides by its std without the sqrt(-dt) factor, so its beta corresponds to ours divided by -dt.
Everything random (the steps trained) derives from each trajectory's own seed and the update index, so the
result does not depend on how rows are split over micro-steps or processes.
"""

from __future__ import annotations

import torch
from vpo_core import (BuildContext, Objective, ObjectiveOutput, StepContext, TrajectoryBatch, TrajectorySettings,
                      TransitionBatch, derive_seed)

from .config import GRPOConfig


def group_advantages(scores: torch.Tensor, groups: torch.Tensor, step_scores: torch.Tensor, std: str,
                     clip: float) -> torch.Tensor:
    """Per-row advantage of one score key: normalised within the row's prompt group."""
    scores = scores.float()
    out = torch.empty_like(scores)
    global_std = step_scores.float().std(unbiased=False)
    for g in groups.unique():
        rows = groups == g
        spread = scores[rows].std(unbiased=False) if std == "per_prompt" else global_std
        out[rows] = (scores[rows] - scores[rows].mean()) / (spread + 1e-4)
    return out.clamp(-clip, clip)


class GRPOObjective(Objective):
    def __init__(self, config: GRPOConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.group_metrics: dict[str, float] = {}

    def trajectory_settings(self) -> TrajectorySettings:
        window = tuple(self.config.sde_window) if self.config.sde_window is not None else None
        return TrajectorySettings(noise_level=self.config.noise_level, window=window)

    def expand(self, batch: TrajectoryBatch, ctx: StepContext) -> TransitionBatch:
        c, traj = self.config, batch.trajectory
        groups = torch.tensor(batch.groups)
        advantages = sum(weight * group_advantages(batch.scores[key].cpu(), groups, batch.step_scores[key].cpu(),
                                                   c.std, c.adv_clip_max) for key, weight in c.rewards.items())
        spread = [batch.scores[k].float().cpu()[groups == g].std(unbiased=False) for k in c.rewards
                  for g in groups.unique()]
        self.group_metrics = {"group_reward_std": float(torch.stack(spread).mean()),
                              "advantage_abs_mean": float(advantages.abs().mean())}
        count = max(1, int(len(traj.steps) * c.timestep_fraction))
        rows, steps = [], []
        for i, seed in enumerate(traj.seeds):
            if c.timestep_order == "first":
                chosen = traj.steps[:count]
            else:
                g = torch.Generator().manual_seed(derive_seed(seed, "grpo-steps", ctx.step, ctx.update))
                chosen = [traj.steps[j] for j in torch.randperm(len(traj.steps), generator=g)[:count].tolist()]
            rows += [i] * len(chosen)
            steps += chosen
        return TransitionBatch(traj, rows, steps, advantages[rows])

    def loss(self, policy, batch: TransitionBatch, ctx: StepContext) -> ObjectiveOutput:
        c = self.config
        new = policy.transition(batch.trajectory, batch.rows, batch.steps)
        old = batch.trajectory.log_probs[batch.rows, batch.steps].to(new.log_prob)
        ratio = torch.exp(new.log_prob - old)
        advantages = batch.advantages.to(ratio)
        loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - c.clip_range, 1 + c.clip_range)).mean()
        with torch.no_grad():
            log_ratio = new.log_prob - old
            metrics = {"clip_fraction": float(((ratio - 1).abs() > c.clip_range).float().mean()),
                       "approx_kl": float(0.5 * (log_ratio**2).mean()), "ratio_mean": float(ratio.mean()),
                       "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()), **self.group_metrics}
        if c.kl_beta > 0:
            with torch.no_grad(), policy.use_reference():
                reference = policy.transition(batch.trajectory, batch.rows, batch.steps)
            shape = (-1, *[1] * (new.mean.dim() - 1))
            kl = ((new.mean - reference.mean) ** 2 / (2 * new.std.view(shape) ** 2)).flatten(1).mean(1)
            loss = loss + c.kl_beta * kl.mean()
            metrics["kl"] = float(kl.detach().mean())
        return ObjectiveOutput(loss=loss, metrics=metrics)
