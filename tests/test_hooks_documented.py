"""Every hook has documentation and at least one test (datasette's rule)."""

from pathlib import Path

import pytest

from vpo_core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("vpo_register_"))


def test_hooks_found():
    assert len(HOOKS) == 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    docs = (ROOT / "docs" / "hooks.md").read_text()
    assert f"## {hook}\n" in docs, f"add a '## {hook}' section to docs/hooks.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name]
    assert any(hook in p.read_text() for p in tests), f"no test in tests/ uses {hook}"
