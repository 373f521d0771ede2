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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import SpecError
from .types import Pair, PairBatch


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
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
        perm = np.random.default_rng(derive_seed(seed, "epoch", epoch)).permutation(n)
        take = min(count - len(out), n - offset)
        out.extend(int(i) for i in perm[offset:offset + take])
        pos += take
    return out


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
        if not meta_path.exists():
            meta_path.write_text(json.dumps({"format": "vpo-pairs", "version": 1, **(meta or {})}, indent=1))

    def has_group(self, index: int) -> bool:
        return (self.directory / "groups" / f"{index:06d}.json").exists()

    def write_group(self, index: int, prompt: str, latents: torch.Tensor, seeds: list[int],
                    scores: dict[str, torch.Tensor], pairs: list[Pair]) -> None:
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


class PairDataset:
    """Reads the "vpo" pair layout; ``batch(indices)`` returns a ``PairBatch``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = self.directory / "meta.json"
        if not meta.is_file():
            raise SpecError(f"'{directory}' is not a vpo pair dataset (no meta.json); build one with "
                            f"`vpo build-pairs SPEC --out DIR`", "data.pairs")
        self.records: list[PairRecord] = []
        for path in sorted((self.directory / "groups").glob("[0-9]*.json")):
            group = int(path.stem)
            info = json.loads(path.read_text())
            for p in info["pairs"]:
                self.records.append(PairRecord(info["prompt"], group, p["winner"], p["loser"],
                                               p.get("weight", 1.0), p.get("margin", 0.0)))
        if not self.records:
            raise SpecError(f"pair dataset '{directory}' holds no pairs", "data.pairs")
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _latents(self, group: int) -> torch.Tensor:
        if group not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[group] = load_file(str(self.directory / "groups" / f"{group:06d}.safetensors"))["latents"]
        return self._cache[group]

    def batch(self, indices: list[int]) -> PairBatch:
        recs = [self.records[i] for i in indices]
        return PairBatch(
            winner_latents=torch.stack([self._latents(r.group)[r.winner] for r in recs]),
            loser_latents=torch.stack([self._latents(r.group)[r.loser] for r in recs]),
            prompts=[r.prompt for r in recs],
            weights=torch.tensor([r.weight for r in recs], dtype=torch.float32),
            margins=torch.tensor([r.margin for r in recs], dtype=torch.float32),
        )


def pairs_to_batch(pairs: list[Pair], latents: torch.Tensor, prompts: list[str], n: int) -> PairBatch:
    """Gather winner/loser latents of online pairs; ``latents`` rows are prompt-major (p * n + candidate)."""
    win = torch.stack([latents[p.prompt_index * n + p.winner] for p in pairs])
    lose = torch.stack([latents[p.prompt_index * n + p.loser] for p in pairs])
    return PairBatch(
        winner_latents=win, loser_latents=lose,
        prompts=[prompts[p.prompt_index] for p in pairs],
        weights=torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        margins=torch.tensor([p.margin for p in pairs], dtype=torch.float32),
    )
