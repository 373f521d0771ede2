"""Objective ``videodpo_dpo``: Diffusion-DPO on stored pairs against a fixed reference (VideoDPO).

The loss is ``vpo_core.dpo_pair_loss`` with per-pair weights (VideoDPO's re-weighting). The reference is the
base model and is never updated. ``shared_noise`` (default true, as in Diffusion-DPO) uses one timestep and
one noise draw for the winner and the loser of a pair; VideoDPO's released code draws them independently
(VideoDPO issue #11), which ``shared_noise: false`` reproduces.

Pair data (``data.pairs``, ``data.pairs_format``):
* ``vpo``: a dataset built by ``vpo videodpo build-pairs`` (or ``vpo build-pairs``); with ``alpha`` set, the
  stored weights are recomputed from the stored OmniScores.
* ``videodpo``: the layout VideoDPO released (``vpo_videodpo.videodpo_data``), clips encoded with the
  policy's VAE and cached under the run's directory.

Weights: a pair whose OmniScore is <= 0 has no re-weighting weight and is skipped (counted, reported); every
weight is capped at ``max_weight``, once when computed and again in the loss (stored weights of older builds).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from vpo_core import BuildContext, Objective, ObjectiveOutput, PairBatch, SpecError, StepContext

from .config import DEFAULT_MAX_WEIGHT, PAIR_FORMATS, VideoDPOConfig
from .selector import pair_weight
from .videodpo_data import VideoDPOPairDataset

class VideoDPOObjective(Objective):
    def __init__(self, config: VideoDPOConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.output_dir = context.output_dir if context is not None else None

    def loss(self, policy, batch: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        capped = 0
        if self.config.max_weight is not None:
            capped = int((batch.weights > self.config.max_weight).sum())
            batch = dataclasses.replace(batch, weights=batch.weights.clamp(max=self.config.max_weight))
        from vpo_core.dpo import dpo_pair_loss

        out = dpo_pair_loss(policy, batch, ctx.generator, self.config.beta, self.config.shared_noise)
        out.metrics["weights_capped"] = float(capped)
        return out

    def after_optimizer_step(self, step: int, policy) -> dict[str, float]:
        return {}  # fixed reference: VideoDPO never updates it

    def open_pair_dataset(self, path: str, format: str, policy):
        c = self.config
        if format == "vpo":
            return open_vpo_pairs(path, c.alpha, c.weight_reference, c.max_weight)
        if format == "videodpo":
            return VideoDPOPairDataset(path, policy, frames=c.clip_frames, stride=c.clip_stride,
                                       height=c.clip_height, width=c.clip_width, cache_dir=c.cache_dir,
                                       output_dir=self.output_dir, alpha=c.alpha, weight_reference=c.weight_reference,
                                       max_weight=c.max_weight, min_clip_duration=c.min_clip_duration,
                                       allow_outside_paths=c.allow_outside_paths,
                                       drop_duplicate_pairs=c.drop_duplicate_pairs, validate_clips=c.validate_clips)
        raise SpecError(f"objective videodpo_dpo reads pairs_format {' or '.join(PAIR_FORMATS)}, not '{format}'",
                        "data.pairs_format")


def open_vpo_pairs(path: str | Path, alpha: float | None = None, weight_reference: float = 0.72,
                   max_weight: float | None = DEFAULT_MAX_WEIGHT):
    """``vpo_core.data.PairDataset``, refused if an OmniScore build was not finalised; re-weighted if asked
    (pairs with an OmniScore <= 0 are then skipped: ``data.skipped_nonpositive_score`` counts them)."""
    from vpo_core import PairDataset

    directory = Path(path)
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("selector") == "omniscore" and not meta.get("videodpo", {}).get("finalised"):
        raise SpecError(f"pair dataset '{directory}' was built with the omniscore selector but its dataset-level "
                        f"gap filter was not applied (an interrupted or plain `vpo build-pairs` build): run "
                        f"`vpo videodpo build-pairs SPEC --out {directory}` to finish it", "data.pairs")
    data = PairDataset(directory)
    data.skipped_nonpositive_score = 0
    if alpha is not None:
        omni, kept = {}, []
        for record in data.records:
            if record.group not in omni:
                info = json.loads((directory / "groups" / f"{record.group:06d}.json").read_text())
                if "omniscore" not in info:
                    raise SpecError(f"objective.alpha re-weights pairs by their OmniScores, but '{directory}' "
                                    f"stores none (build it with `vpo videodpo build-pairs`), or set alpha: null",
                                    "objective.alpha")
                omni[record.group] = info["omniscore"]
            scores = omni[record.group]
            record.weight = pair_weight(scores[record.winner], scores[record.loser], alpha, weight_reference,
                                        max_weight)
            if record.weight is not None:
                kept.append(record)
        data.skipped_nonpositive_score = len(data.records) - len(kept)
        if not kept:
            raise SpecError(f"every pair of '{directory}' has an OmniScore <= 0, which has no weight under "
                            f"objective.alpha = {alpha}; use alpha: 0", "objective.alpha")
        if data.skipped_nonpositive_score:
            print(f"vpo: videodpo: skipped {data.skipped_nonpositive_score} of {len(data.records)} pairs of "
                  f"'{directory}': an OmniScore <= 0 has no weight (weight_reference / (s_w * s_l)) ** {alpha}",
                  file=sys.stderr)
        data.records = kept
    return data
