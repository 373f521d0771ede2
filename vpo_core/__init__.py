"""vpo: align text-to-video diffusion models with video-centric preference feedback.

Public API for plugins: the hook markers, the part protocols and data types, and shared math.
"""

from .data import PairDataset, PairDatasetWriter, derive_seed, read_prompts
from .dpo import diffusion_dpo_loss, dpo_pair_loss
from .errors import RunError, SpecError, VpoError
from .hookspecs import hookimpl
from .types import (
    BuildContext,
    GradientWindow,
    Objective,
    ObjectiveOutput,
    Pair,
    PairBatch,
    PairSelector,
    PartConfig,
    Policy,
    PromptBatch,
    Reward,
    Rollout,
    StepContext,
    iter_chunks,
)

from .video import read_video, write_video

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier entry points, imported on first use: the spec/loop stack pulls in accelerate.
    if name == "load_spec":
        from .spec import load_spec
        return load_spec
    if name == "PluginManager":
        from .plugins import PluginManager
        return PluginManager
    if name == "build_pair_dataset":
        from .offline import build_pair_dataset
        return build_pair_dataset
    if name == "Trainer":
        from .loop import Trainer
        return Trainer
    raise AttributeError(f"module 'vpo_core' has no attribute {name!r}")


__all__ = [
    "PairDataset", "PairDatasetWriter", "derive_seed", "read_prompts", "read_video", "write_video",
    "load_spec", "PluginManager", "build_pair_dataset", "Trainer",
    "BuildContext", "GradientWindow", "Objective", "ObjectiveOutput", "Pair", "PairBatch", "PairSelector",
    "PartConfig", "Policy", "PromptBatch", "Reward", "Rollout", "RunError", "SpecError", "StepContext",
    "VpoError", "diffusion_dpo_loss", "dpo_pair_loss", "hookimpl", "iter_chunks",
]
