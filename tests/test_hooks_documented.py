"""Every hook has documentation whose signature matches the hook specification, and at least one test
(datasette's rule)."""

import re
from pathlib import Path

import pytest

from vpo_core import hookspecs
from vpo_core.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "hooks.md").read_text()
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("vpo_register_"))


def test_hooks_found():
    assert len(HOOKS) == 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    assert f"## {hook}\n" in DOCS, f"add a '## {hook}' section to docs/hooks.md"
    section = DOCS.split(f"## {hook}\n")[1].split("\n## ")[0]
    documented = re.search(rf"`{hook}\(([^)]*)\)`", section)
    assert documented, f"docs/hooks.md: the {hook} section must show `{hook}(...)`"
    caller = getattr(PluginManager(load_entrypoints=False)._pm.hook, hook)
    assert [a.strip() for a in documented.group(1).split(",")] == list(caller.spec.argnames)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    assert any(hook in p.read_text() for p in tests), f"no test in tests/ uses {hook}"
