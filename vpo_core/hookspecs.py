"""Hook specifications. A plugin implements any of these with ``@vpo_core.hookimpl``.

Each hook receives a ``register`` callback (the simonw/llm pattern) instead of returning lists, so a plugin
registers any number of parts and the core knows which plugin registered which name.

    register(name: str, factory: Callable[[config, BuildContext], part], config_model: type[PartConfig])
"""

import pluggy

hookspec = pluggy.HookspecMarker("vpo")
hookimpl = pluggy.HookimplMarker("vpo")


@hookspec
def vpo_register_policies(register):
    """Register policies: video models that can be sampled and trained (see ``vpo_core.types.Policy``)."""


@hookspec
def vpo_register_rewards(register):
    """Register rewards: score frames ``[B,T,C,H,W]`` in [0,1] per dimension (``vpo_core.types.Reward``)."""


@hookspec
def vpo_register_pair_selectors(register):
    """Register pair selectors: scores ``[P,N]`` -> preference pairs (``vpo_core.types.PairSelector``)."""


@hookspec
def vpo_register_objectives(register):
    """Register objectives: a batch of pairs or prompts -> loss (``vpo_core.types.Objective``)."""


@hookspec
def vpo_register_commands(register):
    """Register CLI sub-commands under ``vpo <name>``.

    ``register(name, configure, run, help)``: ``configure(parser)`` adds arguments to an argparse parser,
    ``run(args) -> int`` returns the exit code (raise ``vpo_core.VpoError`` for user mistakes).
    """
