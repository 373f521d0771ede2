"""Objective ``dpo``: Diffusion-DPO on preference pairs, with OnlineVPO's curriculum reference update.

The math is ``vpo_core.dpo_pair_loss`` (per-sample losses averaged over every non-batch dim, then
``-w * logsigmoid(-beta/2 * ((l_w - l_l) - (l_w^ref - l_l^ref)))``). Every ``reference_update_every`` = K
optimizer steps the reference becomes a copy of the current policy (OnlineVPO: K = 200; 0 keeps the
initial reference, i.e. plain Diffusion-DPO).
"""

from __future__ import annotations

from typing import Any

from vpo_core import BuildContext, Objective, ObjectiveOutput, PairBatch, StepContext

from .config import DPOConfig


class DPOObjective(Objective):
    def __init__(self, config: DPOConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.last_reference_update = 0  # optimizer step of the latest update (0: the initial reference)
        self.reference_updates = 0

    def loss(self, policy, batch: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        from vpo_core.dpo import dpo_pair_loss

        out = dpo_pair_loss(policy, batch, ctx.generator, self.config.beta, self.config.shared_noise)
        if self.config.reference_update_every:
            out.metrics["reference_age"] = float(ctx.step - 1 - self.last_reference_update)
        return out

    def after_optimizer_step(self, step: int, policy) -> dict[str, float]:
        """Reference := policy after steps K, 2K, ... .

        The loop calls this only after steps that updated the weights. If step mK itself was skipped (no
        pairs, non-finite loss), the update happens after the next completed step instead of waiting for
        (m+1)K, so the reference never falls more than one block behind.
        """
        k = self.config.reference_update_every
        if not k:
            return {}
        if step // k > self.last_reference_update // k:
            policy.update_reference()
            self.last_reference_update = step
            self.reference_updates += 1
            return {"reference_updated": 1.0, "reference_updates": float(self.reference_updates)}
        return {"reference_updated": 0.0, "reference_updates": float(self.reference_updates)}

    # JSON-serialisable state saved in checkpoints (the reference weights live in the policy's checkpoint).
    def state_dict(self) -> dict[str, Any]:
        return {"last_reference_update": self.last_reference_update, "reference_updates": self.reference_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_reference_update = int(state.get("last_reference_update", 0))
        self.reference_updates = int(state.get("reference_updates", 0))
