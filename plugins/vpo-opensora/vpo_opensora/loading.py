"""Reading Open-Sora's published checkpoints: a hub id or a local directory holding ``config.json`` and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``), one code path for both."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from vpo_core import VpoError

WEIGHT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]


def looks_local(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_directory(name: str, what: str, layout: str) -> Path:
    """The local directory of ``name``: itself, or the hub snapshot of ``config.json`` + safetensors weights."""
    if looks_local(name):
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise VpoError(f"{what} directory {name!r} does not exist; expected {layout}.")
        return directory
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=WEIGHT_PATTERNS))
    except Exception as error:  # offline, unknown repo, gated, ...: one message, no traceback
        raise VpoError(f"could not fetch {what} {name!r} from the hub ({type(error).__name__}: {error}); give a "
                       f"reachable hub id or a local directory with {layout}.") from None


def read_config(directory: Path, what: str, layout: str, model_type: str) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise VpoError(f"{what}: {path} is missing; expected {layout}.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise VpoError(f"{what}: {path} is not valid JSON ({error}).") from None
    found = config.get("model_type", model_type)
    if found != model_type:
        raise VpoError(f"{what}: {path} has model_type {found!r}, expected {model_type!r} ({layout}).")
    return config


def read_weights(directory: Path, what: str, layout: str) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index lists (safetensors only: no pickles)."""
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (found {pickles}: pickled weights are not read; convert them to safetensors)" if pickles else ""
        raise VpoError(f"{what}: no model.safetensors in {directory}{hint}; expected {layout}.")
    state = {}
    for file in files:
        if not file.is_file():
            raise VpoError(f"{what}: shard {file} listed in {index} is missing.")
        state.update(load_file(str(file)))
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: Path, layout: str,
                optional: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict`` that names the file and the first mismatching keys instead of a traceback.
    Keys in ``optional`` may be absent from the file (the module keeps its own value)."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                problems.append(f"{len(keys)} {label} (e.g. {keys[:3]})")
        raise VpoError(f"{what}: the weights in {source} do not fit the architecture its config.json describes: "
                       f"{'; '.join(problems)}. Expected {layout}.")
    module.load_state_dict({**expected, **state}, strict=True)
