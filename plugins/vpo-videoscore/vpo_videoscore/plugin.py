"""Registers the ``videoscore`` reward (imports only the config model)."""

from vpo_core import hookimpl

from .config import VideoScoreConfig


def build_videoscore(config, context):
    from .reward import build

    return build(config, context)


@hookimpl
def vpo_register_rewards(register):
    register("videoscore", build_videoscore, VideoScoreConfig)
