"""Assembling a run from a resolved spec: the accelerator, the parts, the prompts. Training (``loop.py``) and
``vpo build-pairs`` (``offline.py``) both start here.

Every call into a plugin goes through ``call``, and what comes back is checked where it enters the core: a
violated contract or an exception names the plugin, its distribution and version, the call, and what was
expected versus received (exit 1), instead of failing later somewhere in the core.
"""

from __future__ import annotations

import math
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from .data import read_prompts
from .errors import PluginFault, RunError, VpoError
from .spec import ResolvedPart, ResolvedSpec
from .types import BuildContext, Pair

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_KEY = re.compile(r"model|tokenizer|encoder|vae|checkpoint|repo|transformer|unet")


def call(part: ResolvedPart, what: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """``fn(*args)`` on behalf of ``part``; exceptions (and an exceeded ``timeout``) become a PluginFault."""
    def fault(message: str) -> PluginFault:
        return PluginFault(f"{part.kind} '{part.name}' from {part.part_type.origin or part.part_type.plugin}: "
                           f"{what} {message}")
    if timeout is None:
        try:
            return fn(*args)
        except VpoError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a plugin raises, name the plugin
            raise fault(f"raised {type(exc).__name__}: {exc}") from exc
    result: list[Any] = []
    errors: list[BaseException] = []
    # A daemon thread: a reward stuck past its timeout must not keep the process alive at exit.
    worker = threading.Thread(target=lambda: _capture(fn, args, result, errors), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise fault(f"took longer than its timeout_s={timeout} s")
    if errors:
        if isinstance(errors[0], VpoError):
            raise errors[0]
        raise fault(f"raised {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    return result[0]


def _capture(fn: Callable[..., Any], args: tuple, result: list, errors: list) -> None:
    try:
        result.append(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
        errors.append(exc)


def contract(part: ResolvedPart, what: str, expected: str, received: Any) -> PluginFault:
    return PluginFault(f"{part.kind} '{part.name}' from {part.part_type.origin or part.part_type.plugin}: {what} "
                       f"broke the contract: expected {expected}, received {str(received)[:300]}")


class RewardSet:
    """The spec's rewards: scores frames with each, checks each answer, and adds ``total`` =
    sum over rewards of ``weight * mean of that reward's dimensions`` (docs/spec.md)."""

    def __init__(self, rewards: list[tuple[ResolvedPart, Any]]) -> None:
        self.rewards = rewards
        self.dimensions = {part.name: part.config.score_dimensions() for part, _ in rewards}  # as declared

    def __bool__(self) -> bool:
        return bool(self.rewards)

    def score(self, frames, prompts: list[str]) -> dict:
        import torch

        out, total, rows = {}, None, frames.shape[0]
        for part, reward in self.rewards:
            dims = call(part, "score()", reward.score, frames, prompts, timeout=part.timeout_s)
            declared = set(self.dimensions[part.name])
            if not isinstance(dims, dict) or set(dims) != declared:
                raise contract(part, "score()", f"a dict with exactly the keys {sorted(declared)}",
                               sorted(dims) if isinstance(dims, dict) else type(dims).__name__)
            for dim, value in dims.items():
                if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == rows):
                    got = f"{type(value).__name__} {tuple(value.shape)} {value.dtype}" \
                        if isinstance(value, torch.Tensor) else type(value).__name__
                    raise contract(part, f"score()['{dim}']", f"a float tensor with one score per video ({rows})", got)
                if torch.isinf(value).any():
                    raise contract(part, f"score()['{dim}']", "finite scores (or NaN for a video it cannot score)",
                                   value.detach().flatten().tolist())
                out[f"{part.name}.{dim}"] = value.float().reshape(rows).to(frames.device)
            mean = torch.stack([out[f"{part.name}.{d}"] for d in dims]).mean(0)
            total = part.weight * mean if total is None else total + part.weight * mean
        if total is not None:
            out["total"] = total
        return out


def check_pairs(part: ResolvedPart, pairs: Any, prompts: int, candidates: int) -> list[Pair]:
    ok = isinstance(pairs, list) and all(
        isinstance(p, Pair) and 0 <= p.prompt_index < prompts and 0 <= p.winner < candidates
        and 0 <= p.loser < candidates and p.winner != p.loser and math.isfinite(p.weight) and p.weight >= 0
        for p in pairs)
    if not ok:
        raise contract(part, "select()", f"a list of vpo_core.Pair with prompt_index < {prompts}, two different "
                       f"candidate indices < {candidates} and a finite weight >= 0", pairs)
    return pairs


def check_rows(part: ResolvedPart, what: str, tensor: Any, rows: int) -> Any:
    if getattr(tensor, "shape", (None,))[0] != rows:
        raise contract(part, what, f"{rows} rows (one per prompt and seed)", getattr(tensor, "shape", tensor))
    return tensor


@dataclass
class Parts:
    accelerator: Any
    policy: Any
    rewards: RewardSet
    selector: Any
    objective: Any
    train_prompts: list[str]
    eval_prompts: list[str]

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def make_accelerator(resolved: ResolvedSpec, output_dir: Path) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    spec = resolved.spec
    # accelerate keeps a process-wide singleton; a second run in one process (tests, benchmarks) may ask for
    # another mixed precision. Multi-process launches keep their state.
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    import torch

    # Under torchrun / `accelerate launch` on a machine without GPUs, accelerate only goes multi-process (gloo)
    # when told that the run is on the CPU.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # DDP must tolerate weights a step does not use: Wan 2.2's two experts each see only some timesteps. Buffers
    # are not re-broadcast before every forward: the denoisers keep no running statistics (no BatchNorm), their
    # buffers are constants loaded alike on every process (saves a collective per forward pass).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
    return Accelerator(mixed_precision=spec.train.mixed_precision, log_with=resolved.trackers or None,
                       project_dir=str(output_dir), cpu=cpu, kwargs_handlers=[ddp])


def build_parts(resolved: ResolvedSpec, accelerator: Any, output_dir: Path) -> Parts:
    spec = resolved.spec
    preflight_hub(resolved)
    ctx = BuildContext(device=accelerator.device, seed=spec.seed, output_dir=output_dir,
                       mixed_precision=spec.train.mixed_precision, allow_pickle=spec.safety.allow_pickle,
                       trust_remote_code=spec.safety.trust_remote_code)

    def build(part: ResolvedPart | None) -> Any:
        if part is None:
            return None
        try:
            return call(part, "building it", part.part_type.factory, part.config, ctx)
        except PluginFault as fault:
            offline = _offline_cause(fault)
            if offline:
                raise RunError(f"{part.kind} '{part.name}': {offline}") from None
            raise

    policy = build(resolved.policy)
    rewards = RewardSet([(part, build(part)) for part in resolved.rewards])
    parts = Parts(accelerator, policy, rewards, build(resolved.selector), build(resolved.objective),
                  read_prompts(spec.data.prompts, spec.data.prompts_file),
                  read_prompts(spec.data.eval_prompts, spec.data.eval_prompts_file, "data.eval_prompts_file"))
    if spec.eval.max_prompts:
        parts.eval_prompts = parts.eval_prompts[: spec.eval.max_prompts]
    return parts


# ----------------------------------------------------------------------------------------------- hub
def _hub_ids(resolved: ResolvedSpec) -> list[str]:
    """Values of the parts' configs that name Hugging Face repositories: keys that name weights (``model``,
    ``tokenizer``, ``text_encoder``, ``vae``, ``checkpoint``, ...) holding ``org/name`` that is not a local path."""
    found = []

    def visit(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(v, str(k))
        elif isinstance(value, str) and _WEIGHT_KEY.search(key) and _HUB_ID.match(value) \
                and not Path(value).expanduser().exists():
            found.append(value)
    for part in [resolved.policy, *resolved.rewards, resolved.selector, resolved.objective]:
        if part is not None:
            visit(part.config.model_dump())
    return list(dict.fromkeys(found))


def preflight_hub(resolved: ResolvedSpec) -> None:
    """Without network, fail in seconds naming the model that is not cached, instead of after the hub client's
    retries with a message about some file; with a cache and no network, go offline so nothing is retried."""
    ids = _hub_ids(resolved)
    if not ids:
        return
    from huggingface_hub import constants, snapshot_download

    missing = []
    for repo in ids:
        try:
            snapshot_download(repo, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached (or not a repository at all)
            missing.append(repo)
    offline = constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)
    if offline and missing:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise RunError(f"model(s) {missing} are not in the local Hugging Face cache and {why}. Fetch them where "
                       f"there is network: " + "; ".join(f"huggingface-cli download {m}" for m in missing)
                       + " (then copy the cache, ~/.cache/huggingface), or give local directories in the spec")
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _offline_cause(exc: BaseException) -> str | None:
    """A hub 'not cached / offline' error somewhere in the cause chain -> the message a user needs."""
    seen = 0
    while exc is not None and seen < 20:
        name = type(exc).__name__
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline mode" in str(exc).lower():
            return (f"a model it needs is not in the local Hugging Face cache and the hub is offline ({exc}). "
                    f"Fetch it with `huggingface-cli download MODEL_ID` where there is network")
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
