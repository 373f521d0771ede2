"""report.html read with a real HTML parser: every referenced file exists, mp4 samples are playable <video>
elements, every plot carries axis labels, `total` is explained."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from PIL import Image

from vpo_core.cli import main


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data


def test_report_is_complete_and_plays_videos(toy_spec, toy_env):
    assert main(["run", str(toy_spec), "--no-progress", "--set", "eval.every=2", "--set", "eval.video_format=mp4",
                 "--set", "eval.videos=2"]) == 0
    out = toy_spec.parent / "out"
    page = Elements()
    page.feed((out / "report.html").read_text())
    sources = [attrs["src"] for tag, attrs in page.tags if tag in ("img", "video")]
    assert sources and all((out / src).is_file() for src in sources)
    videos = [attrs for tag, attrs in page.tags if tag == "video"]
    assert len(videos) == 2 and all({"controls", "loop", "muted"} <= set(v) and v["src"].endswith(".mp4")
                                    for v in videos)
    assert not any(tag == "img" and attrs["src"].endswith(".mp4") for tag, attrs in page.tags)
    plots = [out / attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert {p.name for p in plots} >= {"reward.png", "loss.png", "eval_curve.png", "eval_gain.png"}
    for plot in plots:
        labels = json.loads(Image.open(plot).text["Description"])
        assert labels["x"] and labels["y"], plot.name
    assert "total = Σ over rewards of weight × mean of that reward's dimensions" in page.text
    assert "1 × mean(toy_brightness.*)" in page.text
    assert "nan" not in page.text.lower()
