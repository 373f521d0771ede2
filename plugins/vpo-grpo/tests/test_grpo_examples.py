"""The GRPO examples validate: the CogVideoX-2B recipe names real hub ids, the toy-world one runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", ["grpo-cogvideox-2b.yaml", "grpo-toyworld.yaml"])
def test_examples_validate(name, monkeypatch, capsys):
    from vpo_core.cli import main
    from vpo_core.plugins import PluginManager
    from vpo_core.spec import load_spec

    monkeypatch.chdir(ROOT)
    assert main(["validate", f"examples/{name}"]) == 0
    assert "valid (trajectories; policy cogvideox, objective grpo" in capsys.readouterr().out
    r = load_spec(ROOT / "examples" / name, PluginManager())
    assert set(r.objective.config.rewards) <= {f"{x.name}.{d}" for x in r.rewards for d in x.config.score_dimensions()}
    if name.startswith("grpo-cogvideox"):
        assert r.policy.config.model == "THUDM/CogVideoX-2b" and r.rewards[0].config.model == "TIGER-Lab/VideoScore-v1.1"
