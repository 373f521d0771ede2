"""vpo-toyworld: a procedural text-to-video world, its ground-truth reward, and a tiny CogVideoX trained on it."""

from pathlib import Path

from vpo_core import VpoError

_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "toyworld-cogvideox"
_WORLD = ("Attributes", "PromptError", "heldout_prompts", "parse_prompt", "render", "render_batch", "train_prompts")


def default_model_path() -> Path:
    """Directory of the shipped base model (diffusers CogVideoXPipeline layout)."""
    if not (_MODEL_DIR / "model_index.json").is_file():
        raise VpoError(
            f"the toy-world base model is missing at {_MODEL_DIR}; reinstall vpo-toyworld or rebuild it with "
            f"`python contrib/vpo-toyworld/train_base.py --output {_MODEL_DIR}`"
        )
    return _MODEL_DIR


def __getattr__(name):  # the world (torch) loads on first use, not when the plugin registers
    if name in _WORLD:
        from . import world

        return getattr(world, name)
    raise AttributeError(name)


__all__ = ["default_model_path", *_WORLD]
