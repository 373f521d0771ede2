"""VideoDPO for vpo: OmniScore, best-vs-worst pair selection with gap filter and re-weighting, offline pair
building, and Diffusion-DPO on stored pairs (vpo's layout or the one VideoDPO released)."""

from .config import (PAIR_FORMATS, VBENCH_DIMENSIONS, VBENCH_QUALITY, VBENCH_SEMANTIC, NormSpec, OmniScoreConfig,
                     OmniScoreSelectorConfig, VideoDPOConfig)

_LAZY = {"build_videodpo_pairs": "build", "finalise_pair_dataset": "build", "VideoDPOObjective": "objective",
         "open_vpo_pairs": "objective", "OmniScore": "omniscore", "omniscore_parts": "omniscore",
         "resolve_key": "omniscore", "OmniScoreSelector": "selector", "dropped_count": "selector",
         "pair_weight": "selector", "select_pairs": "selector",
         "VideoDPOPairDataset": "videodpo_data", "find_layout_dirs": "videodpo_data"}

__all__ = ["PAIR_FORMATS", "VBENCH_DIMENSIONS", "VBENCH_QUALITY", "VBENCH_SEMANTIC", "NormSpec", "OmniScoreConfig",
           "OmniScoreSelectorConfig", "VideoDPOConfig", *_LAZY]


# (the function omniscore.omniscore is not re-exported: the submodule of the same name would shadow it)
def __getattr__(name):  # torch loads on first use, not when the plugin registers
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
