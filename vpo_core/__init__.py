"""vpo: align text-to-video diffusion models with video-centric preference feedback.

Public API for plugins: the hook markers, the part protocols and data types, and shared math.
"""

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

__version__ = "0.1.0"

__all__ = [
    "BuildContext", "GradientWindow", "Objective", "ObjectiveOutput", "Pair", "PairBatch", "PairSelector",
    "PartConfig", "Policy", "PromptBatch", "Reward", "Rollout", "RunError", "SpecError", "StepContext",
    "VpoError", "diffusion_dpo_loss", "dpo_pair_loss", "hookimpl", "iter_chunks",
]
