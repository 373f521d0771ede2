"""Seeded batched sampling and stochastic denoising transitions, shared by the policy plugins.

Every row of a batch has its own seed and ``torch.Generator``: its initial noise and every noise draw of a
stochastic step come from that generator alone, so a row is reproducible from its seed whatever batch it is in.

Transitions (for GRPO-style training) are Gaussian, ``x_next = mean + std * z``; log-densities are averaged over
every non-batch dim as DDPO, Flow-GRPO and DanceGRPO do (a sum would be C*T*H*W times larger), in float32.
"""

from __future__ import annotations

import math

import torch


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per row (as a stock diffusers pipeline given ``generator=[...]``)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def randn_rows(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(generators), *shape]`` standard normal noise, row ``i`` drawn from ``generators[i]`` on the CPU."""
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _rows(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row ``[B]`` value shaped to broadcast against ``like`` ``[B, ...]``, in float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *[1] * (like.dim() - 1)) if value.dim() else value


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``log N(x; mean, std^2)`` averaged over every non-batch dim -> ``[B]`` float32 (``std``: scalar or ``[B]``)."""
    x, mean = x.float(), mean.float()
    std = _rows(std, x)
    density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(1)


def flow_sde_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float,
                  sigma_next: torch.Tensor | float, noise_level: float,
                  sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[B]`` of Flow-GRPO's SDE form of an Euler flow-matching step.

    diffusers' flow convention: ``x_sigma = (1 - sigma) x0 + sigma * noise`` and ``velocity = noise - x0``; the
    deterministic step is ``x + velocity * (sigma_next - sigma)``. With ``dt = sigma_next - sigma < 0``:
    ``std_t = noise_level * sqrt(sigma / (1 - sigma'))`` where ``sigma' = sigma_max`` (the schedule's first sigma
    below 1) at ``sigma = 1``, ``mean = x (1 + std_t^2 dt / (2 sigma)) + velocity (1 + std_t^2 (1 - sigma) / (2 sigma)) dt``,
    and the transition std is ``std_t * sqrt(-dt)``.
    """
    x, velocity = x.float(), velocity.float()
    sigma, sigma_next = _rows(sigma, x), _rows(sigma_next, x)
    dt = sigma_next - sigma
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_max), sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, (std_t * torch.sqrt(-dt)).flatten().expand(x.shape[0])


def ddim_step(x: torch.Tensor, pred_x0: torch.Tensor, pred_eps: torch.Tensor, alpha: torch.Tensor | float,
              alpha_prev: torch.Tensor | float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``[B]`` of a DDIM step with ``eta`` (DDPM-like noise at eta = 1), as DDPO's ``ddim_with_logprob``:
    ``std = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))`` and
    ``mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps`` (``alpha`` = cumulative alpha-bar)."""
    x0, eps = pred_x0.float(), pred_eps.float()
    alpha, alpha_prev = _rows(alpha, x0), _rows(alpha_prev, x0)
    std = eta * torch.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    mean = alpha_prev.sqrt() * x0 + torch.sqrt((1 - alpha_prev - std**2).clamp(min=0)) * eps
    return mean, std.flatten().expand(x.shape[0])


def stochastic_step(mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator],
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``x_next = mean + std * z`` (row ``i``'s ``z`` from ``generators[i]``), cast to ``dtype``, and its
    log-density. The density is computed on the *cast* sample, so recomputing it later from stored latents gives
    the same number."""
    z = randn_rows(tuple(mean.shape[1:]), generators, mean.device)
    sample = (mean.float() + _rows(std, mean) * z).to(dtype or mean.dtype)
    return sample, gaussian_log_prob(sample, mean, std)
