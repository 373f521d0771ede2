"""Prompts and stored pair datasets.

Data order is a pure function of (seed, position), so a resumed run reads exactly what an uninterrupted run
would have read: no iterator state has to be saved beyond the position.

Pair dataset layout ("vpo" format), written group by group so an interrupted build resumes:
```
DIR/meta.json                      {"format": "vpo-pairs", "version": 1, "candidates": N, ...}
DIR/groups/000012.safetensors      latents of the N candidates of prompt 12  ("latents": [N, ...])
DIR/groups/000012.json             {"prompt", "seeds", "scores": {key: [N]}, "pairs": [{winner, loser, weight, margin}]}
```
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SpecError
from .types import Pair, PairBatch

MAX_PROMPT_FILE_BYTES = 64 << 20  # a prompt file with a million prompts fits
MAX_PROMPT_CHARS = 10_000
MAX_GROUP_JSON_BYTES = 4 << 20


def read_prompts(prompts: list[str], prompts_file: str | None, key: str = "data.prompts_file") -> list[str]:
    """Inline prompts plus one prompt per non-empty, non-``#`` line of ``prompts_file`` (UTF-8, bounded sizes)."""
    out = list(prompts)
    if not prompts_file:
        return out
    path = Path(prompts_file)
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise SpecError(f"prompt file '{path}' is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB", key)
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read prompt file '{path}': {exc.strerror or exc}", key) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"prompt file '{path}' is not UTF-8 text (line {line})", key) from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS or "\0" in line:
            raise SpecError(f"prompt file '{path}' line {number}: a prompt longer than {MAX_PROMPT_CHARS} characters "
                            f"or with a NUL byte; is this a prompt file?", key)
        out.append(line)
    return out


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed from any tuple of ints/strings (stable across processes and platforms)."""
    ints = [p if isinstance(p, int) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little") for p in parts]
    return int(np.random.SeedSequence([abs(i) for i in ints]).generate_state(1)[0] & 0x7FFFFFFF)


def ordered_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless stream of per-epoch permutations of ``range(n)``."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = _epoch_order(n, seed, epoch)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


@functools.lru_cache(maxsize=2)  # every micro-step reads the same epoch (two at its end): 12 ms each for 1M prompts
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng(derive_seed(seed, "epoch", epoch)).permutation(n)
    order.flags.writeable = False  # shared by every call
    return order


# ----------------------------------------------------------------------------------------------- pairs
@dataclass
class PairRecord:
    prompt: str
    group: int
    winner: int
    loser: int
    weight: float = 1.0
    margin: float = 0.0


class PairDatasetWriter:
    def __init__(self, directory: Path, meta: dict | None = None) -> None:
        self.directory = Path(directory)
        (self.directory / "groups").mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():  # atomically: the processes of a multi-process build all write it
            tmp = meta_path.with_name(f".tmp-meta-{os.getpid()}.json")
            tmp.write_text(json.dumps({"format": "vpo-pairs", "version": 1, **(meta or {})}, indent=1))
            os.replace(tmp, meta_path)

    def has_group(self, index: int) -> bool:
        return (self.directory / "groups" / f"{index:06d}.json").exists()

    def write_group(self, index: int, prompt: str, latents, seeds: list[int], scores: dict, pairs: list[Pair]) -> None:
        from safetensors.torch import save_file

        groups = self.directory / "groups"
        tmp = groups / f".tmp-{index:06d}.safetensors"
        save_file({"latents": latents.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, groups / f"{index:06d}.safetensors")
        record = {
            "prompt": prompt, "seeds": seeds,
            "scores": {k: [float(x) for x in v.detach().cpu().flatten()] for k, v in scores.items()},
            "pairs": [{"winner": p.winner, "loser": p.loser, "weight": p.weight, "margin": p.margin} for p in pairs],
        }
        tmp_json = groups / f".tmp-{index:06d}.json"
        tmp_json.write_text(json.dumps(record))
        os.replace(tmp_json, groups / f"{index:06d}.json")  # the .json marks the group complete


def read_json_file(path: Path, limit: int = MAX_GROUP_JSON_BYTES) -> object:
    """JSON from an untrusted file: bounded size, and every failure as a SpecError naming the file."""
    try:
        if path.stat().st_size > limit:
            raise SpecError(f"'{path}' is larger than {limit >> 20} MiB", "data.pairs")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SpecError(f"cannot read '{path}': {type(exc).__name__}: {str(exc)[:200]}", "data.pairs") from None


class PairDataset:
    """Reads the "vpo" pair layout; ``batch(indices)`` returns a ``PairBatch``. Every group is checked when the
    dataset is opened (before training starts): readable JSON of the documented shape, pair indices within the
    stored candidates, the latent file present with one row per candidate, one file per group number."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        if not (self.directory / "meta.json").is_file():
            raise SpecError(f"'{directory}' is not a vpo pair dataset (no meta.json); build one with "
                            f"`vpo build-pairs SPEC --out DIR`", "data.pairs")
        self.records: list[PairRecord] = []
        seen: dict[int, Path] = {}
        for path in sorted((self.directory / "groups").glob("*.json")):
            if not re.fullmatch(r"\d{1,9}", path.stem):
                continue  # temporaries of an interrupted build (".tmp-...") and foreign files
            group = int(path.stem)
            if group in seen:
                raise SpecError(f"'{path}' and '{seen[group]}' are the same group {group}; remove one", "data.pairs")
            seen[group] = path
            info = read_json_file(path)
            latents = self._latent_path(group)
            try:
                with safe_open(str(latents), "pt") as fh:
                    candidates = fh.get_slice("latents").get_shape()[0]
            except Exception as exc:  # noqa: BLE001 - missing or unreadable file
                raise SpecError(f"'{path}': its latent file '{latents}' is missing or unreadable "
                                f"({type(exc).__name__})", "data.pairs") from None
            pairs = info.get("pairs") if isinstance(info, dict) else None
            if not isinstance(pairs, list) or not isinstance(info.get("prompt"), str):
                raise SpecError(f"'{path}' is not a pair group: expected an object with 'prompt' (text) and 'pairs' "
                                f"(a list)", "data.pairs")
            for i, p in enumerate(pairs):
                fields = (p.get("winner"), p.get("loser"), p.get("weight", 1.0), p.get("margin", 0.0)) \
                    if isinstance(p, dict) else ()
                if len(fields) != 4 or not all(isinstance(x, int) and 0 <= x < candidates for x in fields[:2]) \
                        or fields[0] == fields[1] \
                        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in fields[2:]):
                    raise SpecError(f"'{path}' pairs[{i}] = {str(p)[:120]}: winner and loser must be two different "
                                    f"candidate indices in 0..{candidates - 1}, weight and margin finite numbers",
                                    "data.pairs")
                self.records.append(PairRecord(info["prompt"], group, *fields))
        if not self.records:
            raise SpecError(f"pair dataset '{directory}' holds no pairs", "data.pairs")
        self._cache: dict[int, object] = {}

    def _latent_path(self, group: int) -> Path:
        return self.directory / "groups" / f"{group:06d}.safetensors"

    def __len__(self) -> int:
        return len(self.records)

    def _latents(self, group: int):
        from safetensors.torch import load_file

        if group not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[group] = load_file(str(self._latent_path(group)))["latents"]
        return self._cache[group]

    def batch(self, indices: list[int]) -> PairBatch:
        import torch

        recs = [self.records[i] for i in indices]
        return PairBatch(
            winner_latents=torch.stack([self._latents(r.group)[r.winner] for r in recs]),
            loser_latents=torch.stack([self._latents(r.group)[r.loser] for r in recs]),
            prompts=[r.prompt for r in recs],
            weights=torch.tensor([r.weight for r in recs], dtype=torch.float32),
            margins=torch.tensor([r.margin for r in recs], dtype=torch.float32),
        )


def pairs_to_batch(pairs: list[Pair], latents, prompts: list[str], n: int) -> PairBatch:
    """Gather winner/loser latents of online pairs; ``latents`` rows are prompt-major (p * n + candidate)."""
    import torch

    win = torch.stack([latents[p.prompt_index * n + p.winner] for p in pairs])
    lose = torch.stack([latents[p.prompt_index * n + p.loser] for p in pairs])
    return PairBatch(
        winner_latents=win, loser_latents=lose,
        prompts=[prompts[p.prompt_index] for p in pairs],
        weights=torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        margins=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
    )
