"""Plugin discovery and the registry of parts (a typed facade over pluggy).

Every entry point of the ``vpo`` group is loaded on its own: one that fails to import, implements an
unknown hook, or whose hook raises is recorded as *broken* (distribution, version, error) and the others
keep working. ``VPO_LOAD_PLUGINS=a,b`` loads only those entry points (or distributions);
``VPO_DISABLE_PLUGINS=x`` skips some; ``VPO_EXTRA_PLUGINS=pkg.module`` loads modules that are not installed.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy
from . import hookspecs
from .errors import PluginError, SpecError
from .hookspecs import Register
from .types import CONFIG_BASES, KINDS, Kind, PartConfig

ENTRY_POINT_GROUP = "vpo"

HOOK_OF_KIND: dict[Kind, str] = {
    "policy": "vpo_register_policies",
    "reward": "vpo_register_rewards",
    "selector": "vpo_register_pair_selectors",
    "objective": "vpo_register_objectives",
}


@dataclass
class PartType:
    kind: Kind
    name: str
    factory: Callable[..., Any]
    config_model: type[PartConfig]
    plugin: str
    origin: str = ""  # "plugin 'x' (vpo-x 0.1.0)": how errors name the plugin behind a part


@dataclass
class Command:
    name: str
    configure: Callable[[Any], None]
    run: Callable[[Any], int]
    help: str
    plugin: str


@dataclass
class PluginInfo:
    name: str  # entry-point name (or the name given to ``register_plugin``)
    distribution: str | None = None
    version: str | None = None
    parts: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None

    @property
    def broken(self) -> bool:
        return self.error is not None

    def describe(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else self.name
        return f"plugin '{self.name}' ({dist})"


class DuplicatePartError(PluginError):
    pass


def _split_env(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class PluginManager:
    """Loads plugins and keeps one registry per kind of part."""

    def __init__(self, load_entrypoints: bool = True) -> None:
        self._pm = pluggy.PluginManager("vpo")
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.part_types: dict[Kind, dict[str, PartType]] = {k: {} for k in KINDS}
        self.commands: dict[str, Command] = {}
        if load_entrypoints:
            self.load_entrypoints()

    # ------------------------------------------------------------------------------------------ loading
    def load_entrypoints(self) -> None:
        only = _split_env("VPO_LOAD_PLUGINS")
        disabled = _split_env("VPO_DISABLE_PLUGINS") or set()
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            names = {ep.name, dist_name}
            if only is not None and not names & only:
                continue
            if names & disabled:
                continue
            info = PluginInfo(ep.name, dist_name, dist.version if dist is not None else None)
            try:
                module = ep.load()
            except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything, even SystemExit
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                self.plugins[ep.name] = info
                continue
            self.register_plugin(module, ep.name, info)
        # Modules named here load like entry points without being installed (plugin development, tests).
        for module_name in sorted(_split_env("VPO_EXTRA_PLUGINS") or ()):
            info = PluginInfo(module_name)
            try:
                module = importlib.import_module(module_name)
            except BaseException as exc:  # noqa: BLE001
                info.error = f"import failed: {type(exc).__name__}: {exc}"
                self.plugins[module_name] = info
                continue
            self.register_plugin(module, module_name, info)

    def register_plugin(self, plugin: object, name: str | None = None, info: PluginInfo | None = None) -> PluginInfo:
        """Register a module or object holding hook implementations (tests use this directly)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        info = info or PluginInfo(name)
        info.name = name
        self.plugins[name] = info
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001
            info.error = f"registration failed: {exc}"
            return info
        unknown = self._unknown_hooks(name)
        if unknown:
            self._pm.unregister(name=name)
            info.error = "; ".join(unknown)
            return info
        self._collect(plugin, name, info)
        return info

    def _unknown_hooks(self, name: str) -> list[str]:
        """Like pytest's ``check_pending`` but for one plugin, so a misspelt hook breaks only its plugin."""
        problems = []
        known = list(HOOK_OF_KIND.values()) + ["vpo_register_commands"]
        for hook_name in dir(self._pm.hook):
            if hook_name.startswith("_"):
                continue
            caller = getattr(self._pm.hook, hook_name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin_name == name:
                    close = difflib.get_close_matches(hook_name, known, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    problems.append(f"unknown hook '{hook_name}'{hint}")
        return problems

    def _impl(self, plugin_name: str, hook_name: str) -> Callable[..., Any] | None:
        """The function implementing ``hook_name`` in plugin ``plugin_name``, if any."""
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == plugin_name:
                return impl.function
        return None

    def _collect(self, plugin: object, name: str, info: PluginInfo) -> None:
        """Call this plugin's hooks one by one; on any error keep nothing it registered."""
        registered: list[PartType] = []
        commands: list[Command] = []

        def part_register(kind: Kind) -> Register:
            base = CONFIG_BASES[kind]

            def register(part_name: str, factory: Callable[..., Any], config_model: type[PartConfig] = base) -> None:
                if not isinstance(config_model, type) or not issubclass(config_model, base):
                    raise TypeError(f"config_model of {kind} '{part_name}' must subclass vpo_core.{base.__name__}, "
                                    f"got {config_model!r}")
                registered.append(PartType(kind, part_name, factory, config_model, name, info.describe()))
            return register

        def command_register(cmd_name: str, configure: Callable, run: Callable, help: str = "") -> None:
            commands.append(Command(cmd_name, configure, run, help, name))

        hooks = [(hook, part_register(kind)) for kind, hook in HOOK_OF_KIND.items()]
        hooks.append(("vpo_register_commands", command_register))
        for hook_name, register in hooks:
            impl = self._impl(name, hook_name)
            if impl is None:
                continue
            try:
                impl(register=register)
            except BaseException as exc:  # noqa: BLE001 - a plugin may raise anything
                info.error = f"hook {hook_name} raised {type(exc).__name__}: {exc}"
                self._pm.unregister(name=name)
                return
        for comp in registered:
            existing = self.part_types[comp.kind].get(comp.name)
            if existing is not None:
                raise DuplicatePartError(
                    f"{comp.kind} '{comp.name}' is registered twice: by plugin '{existing.plugin}' and by "
                    f"plugin '{comp.plugin}'. Uninstall one or disable it with VPO_DISABLE_PLUGINS={comp.plugin}"
                )
        for cmd in commands:
            if cmd.name in self.commands:
                raise DuplicatePartError(f"command '{cmd.name}' is registered twice: by plugin "
                                              f"'{self.commands[cmd.name].plugin}' and by plugin '{name}'")
        for comp in registered:
            self.part_types[comp.kind][comp.name] = comp
            info.parts[comp.kind].append(comp.name)
        for cmd in commands:
            self.commands[cmd.name] = cmd

    # ------------------------------------------------------------------------------------------ lookup
    @property
    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.broken]

    def get(self, kind: Kind, name: str, path: str = "", line: int | None = None) -> PartType:
        comp = self.part_types[kind].get(name)
        if comp is not None:
            return comp
        raise missing_part_error(self, kind, name, path, line)


def missing_part_error(pm: PluginManager, kind: Kind, name: str, path: str, line: int | None) -> SpecError:
    """The most useful message for a part name that no loaded plugin registers."""
    from .registry import find_provider  # local import: registry reads a YAML file

    provider = find_provider(kind, name)
    if provider is not None:
        broken = next((p for p in pm.broken if provider.distribution in {p.distribution, p.name}), None)
        if broken is not None:
            return SpecError(
                f"{kind} '{name}' comes from {broken.describe()}, which is installed but broken: {broken.error}",
                path, line, exit_code=3)
        try:
            md.distribution(provider.distribution)
        except md.PackageNotFoundError:
            return SpecError(f"{kind} '{name}' is not installed. Install it with: {provider.install}",
                             path, line, exit_code=3)
        only, off = os.environ.get("VPO_LOAD_PLUGINS"), os.environ.get("VPO_DISABLE_PLUGINS")
        why = f"VPO_DISABLE_PLUGINS={off} disables it" if off and {provider.name, provider.distribution} & \
            _split_env("VPO_DISABLE_PLUGINS") else f"VPO_LOAD_PLUGINS={only} does not include it"
        return SpecError(f"{kind} '{name}' comes from {provider.distribution}, which is installed but not loaded: "
                         f"{why} (add '{provider.name}' to VPO_LOAD_PLUGINS or unset it)", path, line, exit_code=3)
    known = sorted(pm.part_types[kind])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    listing = ", ".join(known) if known else "none installed"
    plural = {"policy": "policies"}.get(kind, kind + "s")
    message = f"unknown {kind} '{name}'{hint} Installed {plural}: {listing}."
    if pm.broken:
        # A broken plugin registers nothing, so we cannot know its parts: name it, it is the likely provider.
        broken = "; ".join(f"{p.describe()}: {p.error}" for p in pm.broken)
        return SpecError(f"{message} Broken plugins that may provide it: {broken}", path, line, exit_code=3)
    return SpecError(f"{message} Run `vpo plugins` to list installed plugins.", path, line, exit_code=2)
