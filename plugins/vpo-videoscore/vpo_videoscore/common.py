"""Pieces shared by the VideoScore variants: the query prompt, checkpoint files, loading, pooling."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from vpo_core import VpoError

from .config import DIMENSIONS  # noqa: F401 (re-exported)

# The regression query of the official VideoScore inference code (TIGER-AI-Lab/VideoScore, examples/): the
# models were trained on exactly this text, so it must not be reworded. "{text_prompt}" is the video's prompt.
REGRESSION_QUERY_PROMPT = """
Suppose you are an expert in judging and evaluating the quality of AI-generated videos,
please watch the following frames of a given video and see the text prompt for generating the video,
then give scores from 5 different dimensions:
(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color
(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements
(3) dynamic degree, the degree of dynamic changes
(4) text-to-video alignment, the alignment between the text prompt and the video content
(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge

for each dimension, output a float number from 1.0 to 4.0,
the higher the number is, the better the video performs in that sub-score, 
the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)
Here is an output example:
visual quality: 3.2
temporal consistency: 2.7
dynamic degree: 4.0
text-to-video alignment: 2.3
factual consistency: 1.8

For this video, the text prompt is "{text_prompt}",
all the frames of video are as follows:
"""


class CheckpointError(VpoError):
    """A VideoScore checkpoint is missing or is not a VideoScore regression model."""


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source


def check_source(source: str) -> None:
    """Fail early, with the fix in the message, for a local path that does not exist."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"VideoScore checkpoint {source!r} is a file; pass the checkpoint directory.")
    elif looks_like_path(source):
        raise CheckpointError(
            f"VideoScore checkpoint directory {source!r} does not exist. Pass an existing directory or a hub id "
            "such as TIGER-Lab/VideoScore-v1.1."
        )


def read_json(source: str, filename: str, revision: str | None = None, required: bool = False) -> dict | None:
    """A JSON file of a local checkpoint directory or hub repo; ``None`` if absent and not ``required``."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / filename
        if not file.is_file():
            if required:
                raise CheckpointError(f"{source}: no {filename}; expected a transformers checkpoint directory.")
            return None
        return json.loads(file.read_text())
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, filename, revision=revision)).read_text())
    except Exception as err:  # not found, gated, offline without a cached copy
        absent = isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError)
        if absent and not required:
            return None
        if absent:
            raise CheckpointError(f"hub repo {source}: no {filename}; expected a transformers checkpoint.") from None
        raise CheckpointError(
            f"cannot fetch {filename} of VideoScore checkpoint {source!r} (revision {revision or 'main'}): "
            f"{type(err).__name__}: {str(err).rstrip('.')}. Check the hub id and network access "
            "(HF_HUB_OFFLINE), or pass a local directory."
        ) from None


def load_model(model_class, source: str, revision: str | None, dtype: torch.dtype, **kwargs):
    """``from_pretrained`` that turns missing weights (e.g. no ``score.*`` head) into a clear error.

    The model is frozen and in eval mode: a reward is never trained, gradients only flow to the pixels.
    """
    model, info = model_class.from_pretrained(
        source, revision=revision, dtype=dtype, output_loading_info=True, **kwargs
    )
    missing = sorted(info.get("missing_keys", []))
    if missing:
        head = [k for k in missing if k.startswith("score.")]
        what = "the regression head (score.weight/score.bias)" if head else f"{len(missing)} weights"
        raise CheckpointError(
            f"{source}: the checkpoint lacks {what} (missing: {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}). Expected a VideoScore regression checkpoint such as "
            "TIGER-Lab/VideoScore-v1.1, not a base or generative model."
        )
    return model.eval().requires_grad_(False)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def right_pad(rows: list[list[int]], pad_id: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids, attention_mask), padded on the right so that the positions of real tokens
    equal those of the unpadded row (a micro-batch scores like one sample at a time)."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id if pad_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)
