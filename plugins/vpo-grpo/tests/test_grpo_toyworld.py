"""GRPO on the toy world (examples/grpo-toyworld.yaml shortened to 30 steps at the faster learning rate 1e-3) raises
the held-out ground-truth reward by more than two standard errors of the paired gain (same held-out prompts and
seeds before and after)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_grpo_raises_the_heldout_ground_truth(monkeypatch, tmp_path):
    pytest.importorskip("vpo_toyworld")
    from vpo_core.cli import main

    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    for var in ("VPO_LOAD_PLUGINS", "VPO_DISABLE_PLUGINS", "VPO_EXTRA_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "grpo"
    assert main(["run", "examples/grpo-toyworld.yaml", "--no-progress", "--output-dir", str(out),
                 "--set", "train.steps=30", "--set", "train.learning_rate=1e-3", "--set", "eval.every=0",
                 "--set", "eval.videos=0",
                 "--set", "checkpoint.every=0", "--set", "logging.trackers=[]"]) == 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["scores"]["toy.overall"], evals[-1]["scores"]["toy.overall"]
    gains = [a - b for a, b in zip(after, before)]
    mean = sum(gains) / len(gains)
    sem = math.sqrt(sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains))
    print(f"held-out toy.overall gain {mean:+.4f} ± {sem:.4f} over {len(gains)} videos")
    assert mean > 2 * sem, f"gain {mean:+.4f} is not above 2 standard errors ({sem:.4f})"
