"""Hook implementations: the module the ``vpo`` entry point names. Keep it to ``register`` calls."""

from vpo_core import hookimpl

from .reward import VBenchLiteConfig, build_vbench_lite


@hookimpl
def vpo_register_rewards(register):
    register("vbench_lite", build_vbench_lite, VBenchLiteConfig)
