"""The README does not drift from the code: every core spec key is documented, CI runs its test command."""

import re
from pathlib import Path

import pytest

from vpo_core import spec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTIONS = {"data": spec.DataSpec, "train": spec.TrainSpec, "eval": spec.EvalSpec,
            "checkpoint": spec.CheckpointSpec, "logging": spec.LoggingSpec, "safety": spec.SafetySpec}


@pytest.mark.parametrize("section,model", SECTIONS.items(), ids=list(SECTIONS))
def test_every_core_key_is_in_the_spec_reference(section, model):
    rows = [ln for ln in README.splitlines() if ln.startswith(f"| `{section}` |")]
    documented = set(re.findall(r"`(\w+)`", " ".join(r.split("|")[2] for r in rows)))
    assert set(model.model_fields) == documented


def test_top_level_keys_documented():
    for key in spec.RunSpec.model_fields:
        assert f"\n{key}:" in README or f"`{key}`" in README, key


def test_ci_runs_the_readme_test_command():
    command = "pip install torch==2.13.0 && pip install -r requirements-dev.txt && python -m pytest"
    assert f"\n{command}\n" in README
    assert command in (ROOT / ".ci" / "run").read_text()


def test_requirements_install_every_plugin():
    req = (ROOT / "requirements-dev.txt").read_text()
    for pyproject in ROOT.glob("*/vpo-*/pyproject.toml"):
        assert f"-e {pyproject.parent.relative_to(ROOT)}\n" in req
