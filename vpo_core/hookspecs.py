"""Hook specifications. A plugin implements any of these with ``@vpo_core.hookimpl``.

Each hook receives a ``register`` callback (the simonw/llm pattern) instead of returning lists, so a plugin
registers any number of parts and the core knows which plugin registered which name. docs/hooks.md documents
every hook; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("vpo")
hookimpl = pluggy.HookimplMarker("vpo")


def lazy(target: str) -> Callable[..., Any]:
    """``"package.module:name"`` -> a callable that imports it on first use: a plugin registers factories and
    command functions without importing its model code (and torch) when vpo starts."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"lazy({target!r})"
    return call


class Register(Protocol):
    """``register(name, factory, config_model)``: ``factory(config, context) -> part``; ``config_model`` subclasses
    the kind's base (``PolicyConfig``, ``RewardConfig``, ``SelectorConfig``, ``ObjectiveConfig``)."""

    def __call__(self, name: str, factory: Callable[[Any, Any], Any], config_model: type = ...) -> None: ...


class RegisterCommand(Protocol):
    """``register(name, configure, run, help)``: ``configure(parser)`` adds argparse arguments, ``run(args) -> int``."""

    def __call__(self, name: str, configure: Callable[[Any], None], run: Callable[[Any], int],
                 help: str = "") -> None: ...


@hookspec
def vpo_register_policies(register: Register) -> None:
    """Register policies: video models that can be sampled and trained (``vpo_core.Policy``)."""


@hookspec
def vpo_register_rewards(register: Register) -> None:
    """Register rewards: score frames ``[B,T,C,H,W]`` in [0,1] per dimension (``vpo_core.Reward``)."""


@hookspec
def vpo_register_pair_selectors(register: Register) -> None:
    """Register pair selectors: scores ``[P,N]`` -> preference pairs (``vpo_core.PairSelector``)."""


@hookspec
def vpo_register_objectives(register: Register) -> None:
    """Register objectives: a batch -> loss (``vpo_core.Objective``)."""


@hookspec
def vpo_register_commands(register: RegisterCommand) -> None:
    """Register CLI sub-commands under ``vpo <name>`` (raise ``vpo_core.VpoError`` for user mistakes;
    ``args.plugin_manager`` holds the loaded plugins)."""
