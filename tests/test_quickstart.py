"""The embedded default: examples/quickstart.yaml validates, and a shortened run improves the held-out reward.

Integration test over the shipped toy CogVideoX (contrib/vpo-toyworld), vpo-cogvideox and vpo-onlinevpo.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpo_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.fixture
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart's paths are relative to the repository root
    for var in ("VPO_LOAD_PLUGINS", "VPO_DISABLE_PLUGINS", "VPO_EXTRA_PLUGINS"):
        monkeypatch.delenv(var, raising=False)


def test_quickstart_validates(in_repo_root):
    assert main(["validate", str(QUICKSTART)]) == 0


def test_prompt_files_match_the_toy_world():
    import vpo_toyworld

    def lines(name):
        return (ROOT / "examples" / "prompts" / name).read_text().splitlines()

    assert lines("toyworld-train.txt") == vpo_toyworld.train_prompts()
    assert lines("toyworld-heldout.txt") == vpo_toyworld.heldout_prompts()


def test_shortened_quickstart_improves_heldout_reward(in_repo_root, tmp_path):
    out = tmp_path / "quick"
    code = main(["run", str(QUICKSTART), "--no-progress", "--output-dir", str(out),
                 "--set", "train.steps=30", "--set", "eval.every=0", "--set", "eval.videos=1", "--set", "eval.video_scale=1",
                 "--set", "checkpoint.every=0", "--set", "eval.max_prompts=16", "--set", "logging.trackers=[]"])
    assert code == 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0]["scores"]["toy.overall"], evals[-1]["scores"]["toy.overall"]
    assert evals[0]["seeds"] == evals[-1]["seeds"]  # the same held-out prompts and seeds
    gain = sum(a - b for a, b in zip(after, before)) / len(before)
    assert gain > 0.0, f"held-out toy.overall did not improve: {gain:+.4f}"
    assert (out / "final" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "report.html").exists()
