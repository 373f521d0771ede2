"""OmniScore (VideoDPO): one number per video from many reward dimensions.

For every configured key ``k`` (a score key ``"<reward>.<dim>"``, or a bare ``dim`` matched against the
score keys' suffixes)::

    norm_k    = (raw_k / divide_by_k - min_k) / (max_k - min_k)
    Quality   = sum_k w_k * norm_k / sum_k w_k          over the quality keys
    Semantic  = the same over the semantic keys
    OmniScore = (qw * Quality + sw * Semantic) / (qw + sw)   VideoDPO: qw = 4, sw = 1
              = Quality when no semantic key is configured (or found, with on_missing: skip)

A key's ``min``/``max``/``weight``/``divide_by`` left unset take VBench's values when the dimension name
(the part after the last ".") is a VBench dimension (table below, as in VideoDPO's OmniScore code), else
``[0, 1]``, weight 1, divide_by 1. Normalised values are not clipped (VideoDPO does not clip either).
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
from vpo_core import RunError

from .config import VBENCH_DIMENSIONS, VBENCH_QUALITY, VBENCH_SEMANTIC, NormSpec, OmniScoreConfig  # noqa: F401

NormTable = Mapping[str, Optional[NormSpec]]


def _as_specs(table: Mapping[str, object] | None) -> dict[str, NormSpec]:
    out = {}
    for key, spec in (table or {}).items():
        out[key] = spec if isinstance(spec, NormSpec) else NormSpec.model_validate(spec or {})
    return out


def resolve_key(key: str, available: list[str] | tuple[str, ...]) -> str | None:
    """The score key ``key`` stands for: itself, else the one key ending in ``"." + key``; None if absent."""
    if key in available:
        return key
    matches = [k for k in available if k.endswith("." + key)]
    if len(matches) > 1:
        raise RunError(f"OmniScore key '{key}' is ambiguous: several rewards give it ({', '.join(matches)}); "
                       f"write the full key '<reward name>.{key}' in `quality:` / `semantic:`")
    return matches[0] if matches else None


def _group_score(scores: Mapping[str, torch.Tensor], table: dict[str, NormSpec], group: str,
                 on_missing: str) -> torch.Tensor | None:
    total, weights = None, 0.0
    missing = []
    for key, spec in table.items():
        found = resolve_key(key, tuple(scores))
        if found is None:
            missing.append(key)
            continue
        low, high, weight, divide_by = spec.resolved(key)
        norm = (scores[found].detach().double() / divide_by - low) / (high - low)  # float64: exact ranking
        total = weight * norm if total is None else total + weight * norm
        weights += weight
    if missing and on_missing == "error":
        raise RunError(
            f"OmniScore {group} key(s) {missing} match no score; available keys: {sorted(scores)}. Map them to "
            f"your rewards' dimensions in `{group}:` (e.g. 'vb.temporal_flickering') or set `on_missing: skip`")
    if total is None:
        return None
    if weights <= 0:
        raise RunError(f"OmniScore {group} weights sum to 0; give at least one key a positive weight")
    return total / weights


def omniscore_parts(scores: Mapping[str, torch.Tensor], quality: Mapping[str, object] | None = None,
                    semantic: Mapping[str, object] | None = None, quality_weight: float = 4.0,
                    semantic_weight: float = 1.0, on_missing: Literal["error", "skip"] = "error"
                    ) -> dict[str, torch.Tensor]:
    """``{"omniscore", "quality"[, "semantic"]}``, each shaped like the input scores.

    ``quality`` / ``semantic``: ``{key: NormSpec | dict | None}``; None means VideoDPO's VBench sets.
    """
    q_table = _as_specs({k: None for k in VBENCH_QUALITY} if quality is None else quality)
    s_table = _as_specs({k: None for k in VBENCH_SEMANTIC} if semantic is None else semantic)
    q = _group_score(scores, q_table, "quality", on_missing)
    if q is None:
        raise RunError(f"OmniScore: none of the quality keys {list(q_table)} match a score "
                       f"(available: {sorted(scores)}); map them to your rewards' dimensions in `quality:`")
    out = {"quality": q}
    s = _group_score(scores, s_table, "semantic", on_missing) if s_table else None
    if s is None:
        out["omniscore"] = q
    else:
        out["semantic"] = s
        out["omniscore"] = (quality_weight * q + semantic_weight * s) / (quality_weight + semantic_weight)
    return out


def omniscore(scores: Mapping[str, torch.Tensor], quality: Mapping[str, object] | None = None,
              semantic: Mapping[str, object] | None = None, quality_weight: float = 4.0,
              semantic_weight: float = 1.0, on_missing: Literal["error", "skip"] = "error") -> torch.Tensor:
    """OmniScore of every video: ``scores[key]`` of any shape (``[N]``, ``[P, N]``) -> the same shape."""
    return omniscore_parts(scores, quality, semantic, quality_weight, semantic_weight, on_missing)["omniscore"]


class OmniScore:
    """``OmniScore(config)(scores) -> Tensor``; ``parts(scores)`` also gives Quality and Semantic."""

    def __init__(self, config: OmniScoreConfig | None = None) -> None:
        self.config = config or OmniScoreConfig()

    def parts(self, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        return omniscore_parts(scores, c.quality, c.semantic, c.quality_weight, c.semantic_weight, c.on_missing)

    def __call__(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.parts(scores)["omniscore"]
