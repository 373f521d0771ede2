"""Registers the ``videoscore`` reward."""

from vpo_core import hookimpl

from .reward import VideoScoreConfig, build


@hookimpl
def vpo_register_rewards(register):
    register("videoscore", build, VideoScoreConfig)
