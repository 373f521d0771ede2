"""Diffusion-DPO (Wallace et al. 2023), shared by the online (vpo-onlinevpo) and offline (vpo-videodpo) plugins.

Per-sample denoising losses l = mean over *all* non-batch dims of the model's squared error (the policy's
``denoising_loss`` does that reduction). VideoDPO's released code leaves the width dim unaveraged before the
logsigmoid (VideoDPO issue #6); we average every dim, so beta keeps the meaning of the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import ObjectiveOutput, PairBatch, Policy


def diffusion_dpo_loss(
    model_winner: torch.Tensor,
    model_loser: torch.Tensor,
    ref_winner: torch.Tensor,
    ref_loser: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = mean_b( -w_b * logsigmoid(-beta/2 * ((lw - ll) - (lw_ref - ll_ref))) ).

    All inputs are per-sample losses ``[B]``. Returns the loss and metrics: ``implicit_accuracy`` is the
    fraction of pairs where the policy prefers the winner more than the reference does.
    """
    model_diff = model_winner - model_loser
    ref_diff = ref_winner - ref_loser
    inside = -0.5 * beta * (model_diff - ref_diff)
    per_pair = -F.logsigmoid(inside)
    if weights is not None:
        per_pair = per_pair * weights.to(per_pair)
    loss = per_pair.mean()
    with torch.no_grad():
        metrics = {
            "implicit_accuracy": (model_diff < ref_diff).float().mean().item(),
            "model_diff": model_diff.mean().item(),
            "ref_diff": ref_diff.mean().item(),
            "model_loss_winner": model_winner.mean().item(),
            "model_loss_loser": model_loser.mean().item(),
        }
    return loss, metrics


def dpo_pair_loss(
    policy: Policy,
    batch: PairBatch,
    generator: torch.Generator,
    beta: float,
    shared_noise: bool = True,
) -> ObjectiveOutput:
    """Diffusion-DPO on a batch of pairs with ``policy`` and its reference (``policy.use_reference()``).

    ``shared_noise=True`` (default, as in Diffusion-DPO) uses the same timestep and noise for the winner and
    loser of a pair, which lowers variance; ``False`` draws them independently as VideoDPO's code does. Each pair
    draws from its own generator when the batch carries per-pair ``seeds`` (the loop's batches do), so a pair's
    noise does not depend on how pairs are split into micro-steps, chunks or processes; else from ``generator``.
    """
    b = batch.winner_latents.shape[0]
    latents = torch.cat([batch.winner_latents, batch.loser_latents])
    gens = [torch.Generator().manual_seed(int(s)) for s in batch.seeds] if batch.seeds else [generator] * b

    def draw(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A timestep and noise per row of ``rows``, row i from ``gens[i]``."""
        t = torch.cat([policy.sample_timesteps(1, g) for g in gens])
        return t, torch.cat([policy.sample_noise(rows[i:i + 1], g) for i, g in enumerate(gens)])
    if shared_noise:
        t, noise_w = draw(batch.winner_latents)
        timesteps, noise = torch.cat([t, t]), torch.cat([noise_w, noise_w])
    else:
        (t_w, n_w), (t_l, n_l) = draw(batch.winner_latents), draw(batch.loser_latents)
        timesteps, noise = torch.cat([t_w, t_l]), torch.cat([n_w, n_l])
    prompts = list(batch.prompts) * 2
    model = policy.denoising_loss(latents, prompts, timesteps, noise)
    with torch.no_grad(), policy.use_reference():
        ref = policy.denoising_loss(latents, prompts, timesteps, noise)
    loss, metrics = diffusion_dpo_loss(model[:b], model[b:], ref[:b], ref[b:], beta, batch.weights)
    if batch.margins is not None:
        metrics["reward_margin"] = batch.margins.float().mean().item()
    return ObjectiveOutput(loss=loss, metrics=metrics)
