"""Hook implementations: the module the ``vpo`` entry point names. Keep it to ``register`` calls and import
only the config model here; ``lazy`` imports the reward's own module (and torch) when a run builds it."""

from vpo_core import hookimpl, lazy

from .config import VBenchLiteConfig

build_vbench_lite = lazy("vpo_vbench_lite.reward:build")


@hookimpl
def vpo_register_rewards(register):
    register("vbench_lite", build_vbench_lite, VBenchLiteConfig)
