"""Checkpoints and the run-directory lock.

A checkpoint is written to a temporary directory, ends with ``manifest.json`` (size and sha256 of every file,
written last), and is then renamed to ``checkpoints/step-NNNNNN``. Resume verifies the manifest and falls back
to the newest intact checkpoint. Tensors go to safetensors; the optimizer state is read back with
``torch.load(weights_only=True)`` (tensors and plain containers, never arbitrary pickles).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import RunError, SpecError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if p.is_dir() and p.name[:5] == "step-" and p.name[5:].isdigit()] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> list[str]:
    """Problems of a checkpoint directory (empty list: intact)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return [f"{path / MANIFEST} is missing or unreadable (an incomplete write)"]
    problems = []
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != entry["size"] or _sha256(file) != entry["sha256"]:
            problems.append(f"{file} is damaged (size or checksum differs from the manifest)")
    return problems


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are named in a warning. None if there is none at all."""
    found = list_checkpoints(output_dir)
    damaged = []
    for path in reversed(found):
        problems = verify(path)
        if not problems:
            for bad, why in damaged:
                print(f"vpo: warning: checkpoint {bad} is damaged ({'; '.join(why)}); resuming from {path} "
                      f"instead", file=sys.stderr)
            return path
        damaged.append((path, problems))
    if damaged:
        details = "; ".join(p for _, why in damaged for p in why)
        raise SpecError(f"no intact checkpoint to resume from in '{Path(output_dir) / CHECKPOINTS}': {details}. "
                        f"Remove the damaged step-* directories to start over, or restore them from a copy")
    return None


def rng_state() -> dict[str, Any]:
    import numpy as np

    state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [state[0], state[1].tolist(), int(state[2]), int(state[3]), float(state[4])]}


def set_rng_state(state: dict[str, Any], tensors: dict[str, Any]) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(output_dir: Path, step: int, *, policy_state: dict, optimizer_state: dict,
                    scheduler_state: dict, trainer_state: dict[str, Any], keep_last: int) -> Path:
    import torch
    from safetensors.torch import save_file

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in policy_state.items()}, str(tmp / "policy.safetensors"))
        rng = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(dict(trainer_state, step=step, rng=rng_state()), indent=1))
        files = sorted(tmp.iterdir())
        for f in files:  # durable before the manifest vouches for them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        manifest = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(exc, RuntimeError) and shutil.disk_usage(root).free < 64 << 20)  # torch: "unexpected pos"
        if full:
            previous = [p.name for p in list_checkpoints(output_dir)]
            raise RunError(f"disk full while writing checkpoint {step_dir_name(step)} in '{root}' "
                           f"({shutil.disk_usage(root).free >> 20} MiB free); the partial checkpoint was removed"
                           f"{', ' + previous[-1] + ' is intact' if previous else ''}. Free space, then --resume") from None
        raise
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(output_dir: Path) -> None:
    """Remove temporaries of killed checkpoint writes (only ever called while holding the run lock)."""
    root = Path(output_dir) / CHECKPOINTS
    for p in root.glob(".tmp-*") if root.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    readers = {"policy": ("policy.safetensors", lambda f: load_file(str(f))),
               "rng_tensors": ("rng.safetensors", lambda f: load_file(str(f))),
               "optimizer": ("optimizer.pt", lambda f: torch.load(f, weights_only=True)),
               "scheduler": ("scheduler.pt", lambda f: torch.load(f, weights_only=True)),
               "state": ("state.json", lambda f: json.loads(f.read_text()))}
    out = {}
    for key, (name, read) in readers.items():
        try:
            out[key] = read(path / name)
        except Exception as exc:  # noqa: BLE001 - name the file, whatever the reader raised
            raise RunError(f"cannot read checkpoint file {path / name}: {type(exc).__name__}: {exc}") from None
    return out


class RunLock:
    """An exclusive OS lock on a run directory for the life of a run. The kernel releases it when the process
    dies, so a killed run never leaves a stale lock; the file's text names the holder."""

    def __init__(self, directory: Path) -> None:
        import fcntl

        self.path = Path(directory) / ".vpo.lock"
        try:
            self._fh = open(self.path, "a+")
        except FileNotFoundError:  # between this run's mkdir and here, a run that made it failed and removed it
            raise SpecError(f"output_dir '{directory}' was removed while this run started (another run that had made "
                            f"it failed before its first step); start this run again") from None
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            for _ in range(20):  # the holder writes its name just after locking; give it a moment to appear
                self._fh.seek(0)
                holder = self._fh.read().strip()
                if holder:
                    break
                time.sleep(0.05)
            self._fh.close()
            holder = holder or "another process"
            raise SpecError(f"output_dir '{directory}' is in use by another vpo run ({holder}); wait for it to "
                            f"finish or choose another output_dir") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on host {socket.gethostname()}, started "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()  # closing drops the flock
