"""vpo: align text-to-video diffusion models with video-centric preference feedback.

Public API for plugins: the hook marker, the part contract (configs, protocols, data types) and shared helpers.
Importing ``vpo_core`` is light (no torch): plugins register and specs validate in well under a second; the
modules that need torch load on first use.
"""

from .errors import RunError, SpecError, VpoError
from .hookspecs import hookimpl, lazy
from .types import (BuildContext, GradientWindow, LoraSpec, Objective, ObjectiveConfig, ObjectiveOutput, Pair,
                    PairBatch, PairSelector, PartConfig, Policy, PolicyConfig, PromptBatch, Reward, RewardConfig,
                    Rollout, SelectorConfig, StepContext, TrainablePolicy, Trajectory, TrajectoryBatch, TrajectorySettings, Transition,
                    TransitionBatch, iter_chunks)

__version__ = "0.1.0"

_LAZY = {
    "PairDataset": "data", "PairDatasetWriter": "data", "derive_seed": "data", "read_prompts": "data",
    "diffusion_dpo_loss": "dpo", "dpo_pair_loss": "dpo", "read_video": "video", "write_video": "video",
    "load_spec": "spec", "PluginManager": "plugins", "build_pair_dataset": "offline", "Trainer": "loop",
    "TrainableModule": "adapters",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vpo_core' has no attribute {name!r}")


__all__ = sorted(["RunError", "SpecError", "VpoError", "hookimpl", "lazy", "BuildContext", "GradientWindow", "LoraSpec",
                  "Objective", "ObjectiveConfig", "ObjectiveOutput", "Pair", "PairBatch", "PairSelector", "PartConfig", "Policy",
                  "PolicyConfig", "PromptBatch", "Reward", "RewardConfig", "Rollout", "SelectorConfig", "StepContext", "TrainablePolicy", "Trajectory", "TrajectoryBatch", "TransitionBatch",
                  "TrajectorySettings", "Transition", "iter_chunks", *_LAZY])
