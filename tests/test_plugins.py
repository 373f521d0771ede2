"""Plugin discovery, isolation, selection and registration errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from vpo_core import PartConfig, PolicyConfig, hookimpl
from vpo_core.plugins import HOOK_OF_KIND
from vpo_core.types import CONFIG_BASES

KIND_OF_HOOK = {hook: kind for kind, hook in HOOK_OF_KIND.items()}
from vpo_core.errors import PluginError
from vpo_core.plugins import PluginManager


def make_dist(root, dist: str, module: str, body: str, ep_name: str | None = None) -> None:
    """A minimal installed distribution (dist-info + module) that importlib.metadata finds on sys.path."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[vpo]\n{ep_name or dist} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(body))


GOOD = """
from vpo_core import hookimpl, RewardConfig
class C(RewardConfig):
    def score_dimensions(self): return ["x"]
class R:
    def __init__(self, config, context): pass
    def score(self, frames, prompts): return {"x": frames.mean(dim=(1, 2, 3, 4))}
@hookimpl
def vpo_register_rewards(register):
    register("good_reward", R, C)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("VPO_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("VPO_DISABLE_PLUGINS", raising=False)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("vpotest_")]:
        del sys.modules[name]


def test_broken_import_is_isolated(site):
    make_dist(site, "vpotest-good", "vpotest_good", GOOD)
    make_dist(site, "vpotest-bad", "vpotest_bad", "raise RuntimeError('boom at import')\n")
    pm = PluginManager()
    assert "good_reward" in pm.part_types["reward"]
    bad = pm.plugins["vpotest-bad"]
    assert bad.broken and "boom at import" in bad.error
    assert bad.distribution == "vpotest-bad" and bad.version == "1.2.3"


def test_hook_that_raises_is_isolated(site):
    make_dist(site, "vpotest-good", "vpotest_good", GOOD)
    make_dist(site, "vpotest-raiser", "vpotest_raiser", """
        from vpo_core import hookimpl, PolicyConfig
        @hookimpl
        def vpo_register_policies(register):
            register("half_registered", object, PolicyConfig)
        @hookimpl
        def vpo_register_rewards(register):
            raise ValueError("hook exploded")
    """)
    pm = PluginManager()
    assert "good_reward" in pm.part_types["reward"]
    assert "hook exploded" in pm.plugins["vpotest-raiser"].error
    # nothing of a failing plugin stays registered
    assert "half_registered" not in pm.part_types["policy"]


def test_misspelt_hook_fails_loudly(site):
    make_dist(site, "vpotest-typo", "vpotest_typo", """
        from vpo_core import hookimpl, PartConfig
        @hookimpl
        def vpo_register_reward(register):
            register("never", object, PartConfig)
    """)
    pm = PluginManager()
    error = pm.plugins["vpotest-typo"].error
    assert "unknown hook 'vpo_register_reward'" in error and "vpo_register_rewards" in error
    assert "never" not in pm.part_types["reward"]


def test_duplicate_name_names_both_plugins(site):
    make_dist(site, "vpotest-good", "vpotest_good", GOOD)
    make_dist(site, "vpotest-twin", "vpotest_twin", GOOD)
    with pytest.raises(PluginError) as err:
        PluginManager()
    assert "vpotest-good" in str(err.value) and "vpotest-twin" in str(err.value)


def test_load_and_disable_env(site, monkeypatch):
    make_dist(site, "vpotest-good", "vpotest_good", GOOD)
    make_dist(site, "vpotest-bad", "vpotest_bad", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("VPO_LOAD_PLUGINS", "vpotest-good")
    pm = PluginManager()
    assert set(pm.plugins) == {"vpotest-good"}
    monkeypatch.delenv("VPO_LOAD_PLUGINS")
    monkeypatch.setenv("VPO_DISABLE_PLUGINS", "vpotest-bad")
    pm = PluginManager()
    assert "vpotest-bad" not in pm.plugins and "vpotest-good" in pm.plugins


def test_register_rejects_a_config_that_is_not_the_kinds_base(toy_pm):
    class Bad:
        @hookimpl
        def vpo_register_rewards(self, register):
            register("x", object, dict)

    class Wrong:  # a policy config registered as a reward: the core could not read its declarations
        @hookimpl
        def vpo_register_rewards(self, register):
            register("y", object, PolicyConfig)

    for plugin in (Bad(), Wrong()):
        info = toy_pm.register_plugin(plugin, type(plugin).__name__)
        assert info.broken and "must subclass vpo_core.RewardConfig" in info.error
    assert "x" not in toy_pm.part_types["reward"] and "y" not in toy_pm.part_types["reward"]


def test_extra_plugins_env(monkeypatch):
    monkeypatch.setenv("VPO_LOAD_PLUGINS", "nothing")
    monkeypatch.setenv("VPO_EXTRA_PLUGINS", "vpo_core.testing,no_such_module_xyz")
    pm = PluginManager()
    assert "toy" in pm.part_types["policy"]
    assert pm.plugins["no_such_module_xyz"].broken


def test_command_hook(toy_pm):
    class WithCommand:
        @hookimpl
        def vpo_register_commands(self, register):
            register("hello", lambda p: p.add_argument("--name"), lambda a: 7, "say hello")

    toy_pm.register_plugin(WithCommand(), "cmd")
    from vpo_core.cli import build_parser

    args = build_parser(toy_pm.commands.values()).parse_args(["hello", "--name", "x"])
    assert args.func(args, lambda: toy_pm) == 7 and args.plugin_manager is toy_pm


def test_component_config_model_is_strict():
    class C(PartConfig):
        a: int = 1

    with pytest.raises(Exception):
        C.model_validate({"b": 2})


def _plugin_with(hook_name: str, part_name: str):
    """An object implementing one hook that registers ``part_name``."""

    def impl(register):
        register(part_name, lambda config, context: (config, context), CONFIG_BASES[KIND_OF_HOOK[hook_name]])

    return type("P", (), {hook_name: staticmethod(hookimpl(impl))})()


# one test per hook: the name registered through it lands in the right registry, attributed to the plugin
@pytest.mark.parametrize("hook_name,kind", [
    ("vpo_register_policies", "policy"),
    ("vpo_register_rewards", "reward"),
    ("vpo_register_pair_selectors", "selector"),
    ("vpo_register_objectives", "objective"),
])
def test_each_part_hook_registers(hook_name, kind):
    pm = PluginManager(load_entrypoints=False)
    info = pm.register_plugin(_plugin_with(hook_name, f"my_{kind}"), "mine")
    assert not info.broken and info.parts[kind] == [f"my_{kind}"]
    comp = pm.get(kind, f"my_{kind}")
    assert comp.plugin == "mine" and comp.config_model is CONFIG_BASES[kind]
    assert all(not pm.part_types[k] for k in pm.part_types if k != kind)
