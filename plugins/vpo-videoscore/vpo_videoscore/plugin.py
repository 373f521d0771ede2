"""Registers the ``videoscore`` reward (imports only the config model)."""

from vpo_core import hookimpl, lazy

from .config import VideoScoreConfig

build_videoscore = lazy("vpo_videoscore.reward:build")


@hookimpl
def vpo_register_rewards(register):
    register("videoscore", build_videoscore, VideoScoreConfig)
