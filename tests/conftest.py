from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import vpo_core.testing
from vpo_core.testing import TOY_SPEC
from vpo_core.plugins import PluginManager

torch.set_num_threads(1)



@pytest.fixture
def toy_pm() -> PluginManager:
    pm = PluginManager(load_entrypoints=False)
    pm.register_plugin(vpo_core.testing, "toy")
    return pm


@pytest.fixture
def toy_env(monkeypatch):
    """Make `vpo` (in-process or subprocess) see the toy parts without installing anything."""
    monkeypatch.setenv("VPO_EXTRA_PLUGINS", "vpo_core.testing")
    monkeypatch.setenv("VPO_LOAD_PLUGINS", "none-installed")  # first-party plugins are not needed here


@pytest.fixture
def toy_spec(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(TOY_SPEC.format(out=tmp_path / "out"))
    return path


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path
