"""examples/vader-cogvideox-2b.yaml is a valid spec whose objective reads a score key the rewards make."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "vader-cogvideox-2b.yaml"


def test_example_validates_with_vader_settings(monkeypatch, capsys):
    for plugin in ("vpo_cogvideox", "vpo_hpsv2", "vpo_vader"):
        pytest.importorskip(plugin)
    from vpo_core.cli import main
    from vpo_core.plugins import PluginManager
    from vpo_core.spec import load_spec

    monkeypatch.chdir(ROOT)  # prompt files are relative to the repository root
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "valid (rollout" in capsys.readouterr().out

    r = load_spec(EXAMPLE, PluginManager())
    (reward,) = r.rewards
    assert reward.part_type.name == "hpsv2" and list(r.objective.config.rewards) == [f"{reward.name}.score"]
    assert (r.policy.config.model, r.policy.config.num_inference_steps) == ("THUDM/CogVideoX-2b", 25)
    assert (r.objective.config.cutoff, r.objective.config.last_steps) == ("last", 1)
    t = r.spec.train
    assert (t.learning_rate, t.prompts_per_step, t.gradient_accumulation_steps) == (2e-4, 1, 8)
