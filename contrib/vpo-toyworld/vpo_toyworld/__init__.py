"""vpo-toyworld: a procedural text-to-video world, its ground-truth reward, and a tiny CogVideoX trained on it."""

from pathlib import Path

from .world import Attributes, PromptError, heldout_prompts, parse_prompt, render, render_batch, train_prompts

_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "toyworld-cogvideox"


def default_model_path() -> Path:
    """Directory of the shipped base model (diffusers CogVideoXPipeline layout)."""
    return _MODEL_DIR


__all__ = [
    "Attributes", "PromptError", "default_model_path", "heldout_prompts", "parse_prompt", "render",
    "render_batch", "train_prompts",
]
