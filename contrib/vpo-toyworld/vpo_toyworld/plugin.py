"""Hook implementations: registers the toy world's rewards (imports only the config models)."""

from vpo_core import hookimpl

from .config import ToyWorldImageProxyConfig, ToyWorldRewardConfig, ToyWorldVideoProxyConfig


def build_toyworld(config, context):
    from .reward import ToyWorldReward

    return ToyWorldReward(config)


def build_video_proxy(config, context):
    from .proxy import build_video_proxy

    return build_video_proxy(config, context)


def build_image_proxy(config, context):
    from .proxy import build_image_proxy

    return build_image_proxy(config, context)


@hookimpl
def vpo_register_rewards(register):
    register("toyworld", build_toyworld, ToyWorldRewardConfig)
    register("toyworld_video_proxy", build_video_proxy, ToyWorldVideoProxyConfig)
    register("toyworld_image_proxy", build_image_proxy, ToyWorldImageProxyConfig)
