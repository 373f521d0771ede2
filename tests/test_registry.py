"""registry.yaml equals what the installed plugins really register (and every plugin of the repo is listed)."""

from pathlib import Path

import pytest

from vpo_core.plugins import PluginManager
from vpo_core.registry import REGISTRY_PATH, load_registry

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = load_registry(ROOT / "registry.yaml")


@pytest.fixture(scope="module")
def installed(request):
    mp = pytest.MonkeyPatch()
    mp.delenv("VPO_LOAD_PLUGINS", raising=False)
    mp.delenv("VPO_DISABLE_PLUGINS", raising=False)
    mp.delenv("VPO_EXTRA_PLUGINS", raising=False)
    pm = PluginManager()
    mp.undo()
    return pm


def test_packaged_registry_is_the_repository_file():
    assert REGISTRY_PATH.resolve().read_text() == (ROOT / "registry.yaml").read_text()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_entry_matches_installed_plugin(entry, installed):
    info = next((p for p in installed.plugins.values() if p.distribution == entry.distribution), None)
    assert info is not None, f"{entry.distribution} is not installed (pip install -r requirements-dev.txt)"
    assert not info.broken, info.error
    registered = {k: sorted(v) for k, v in info.parts.items() if v}
    commands = sorted(c.name for c in installed.commands.values() if c.plugin == info.name)
    if commands:
        registered["command"] = commands
    assert registered == {k: sorted(v) for k, v in entry.parts.items()}
    assert (ROOT / entry.path / "pyproject.toml").is_file()
    assert entry.install.startswith("pip install")


def test_every_plugin_directory_is_listed():
    listed = {e.path for e in ENTRIES}
    dirs = {f"{p.parent.parent.name}/{p.parent.name}" for p in ROOT.glob("*/vpo-*/pyproject.toml")}
    assert dirs == listed
