"""Hook implementations: the module the ``vpo`` entry point names. Keep it to ``register`` calls and import
only the config model here: the reward's own module (and torch) loads when a run builds it."""

from vpo_core import hookimpl

from .config import VBenchLiteConfig


def build_vbench_lite(config, context):
    from .reward import VBenchLiteReward

    return VBenchLiteReward(config, device=config.device or context.device)


@hookimpl
def vpo_register_rewards(register):
    register("vbench_lite", build_vbench_lite, VBenchLiteConfig)
