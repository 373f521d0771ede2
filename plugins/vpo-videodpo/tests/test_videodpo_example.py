"""The shipped example spec is valid with the installed plugins, and its OmniScore keys match its rewards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from vpo_core.cli import main
from vpo_videodpo import OmniScore, OmniScoreSelectorConfig, VideoDPOConfig

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "videodpo-cogvideox-2b.yaml"


def test_example_validates():
    assert main(["validate", str(EXAMPLE)]) == 0


def test_example_omniscore_keys_are_the_rewards_dimensions():
    spec = yaml.safe_load(EXAMPLE.read_text())
    selector = OmniScoreSelectorConfig.model_validate({k: v for k, v in spec["selector"].items() if k != "type"})
    vb = next(r for r in spec["rewards"] if r["name"] == "vb")
    scores = {f"vb.{dim}": torch.tensor([0.9, 0.95]) for dim in vb["dimensions"]}
    scores["hps.score"] = torch.tensor([0.182, 0.0])
    parts = OmniScore(selector).parts(scores)  # would raise for a key that no reward provides
    assert set(parts) == {"omniscore", "quality", "semantic"}
    assert parts["semantic"].tolist() == pytest.approx([0.5, 0.0])
    objective = VideoDPOConfig.model_validate({k: v for k, v in spec["objective"].items() if k != "type"})
    assert objective.beta == 5000 and objective.shared_noise
    assert spec["train"]["learning_rate"] == 6e-6 and spec["train"]["gradient_accumulation_steps"] == 2
