"""VideoDPO for vpo: OmniScore, best-vs-worst pair selection with gap filter and re-weighting, offline pair
building, and Diffusion-DPO on stored pairs (vpo's layout or the one VideoDPO released)."""

from .build import build_videodpo_pairs, finalise_pair_dataset
from .objective import VideoDPOConfig, VideoDPOObjective, open_vpo_pairs
from .omniscore import (VBENCH_DIMENSIONS, VBENCH_QUALITY, VBENCH_SEMANTIC, NormSpec, OmniScore, OmniScoreConfig,
                        omniscore, omniscore_parts, resolve_key)
from .selector import OmniScoreSelector, OmniScoreSelectorConfig, dropped_count, pair_weight, select_pairs
from .videodpo_data import VideoDPOPairDataset, find_layout_dirs

__all__ = [
    "NormSpec", "OmniScore", "OmniScoreConfig", "OmniScoreSelector", "OmniScoreSelectorConfig",
    "VBENCH_DIMENSIONS", "VBENCH_QUALITY", "VBENCH_SEMANTIC", "VideoDPOConfig", "VideoDPOObjective",
    "VideoDPOPairDataset", "build_videodpo_pairs", "dropped_count", "finalise_pair_dataset", "find_layout_dirs",
    "omniscore", "omniscore_parts", "open_vpo_pairs", "pair_weight", "resolve_key", "select_pairs",
]
