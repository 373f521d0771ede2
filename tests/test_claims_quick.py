"""bench/claims.py --quick runs end to end and writes what the full run writes: the table (every claim, ground truth
and proxy columns as mean ± s.e.), the curves, claims.json with ground truth and proxies scored at every
evaluation, and one labelled plot per claim. Structure only, not conclusions."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image
from vpo_core import PluginManager

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ["C1_online_vs_offline.png", "C2_reference_update.png", "C3_candidates.png", "C4_per_reward_query.png",
         "C5_reward_hacking.png", "C6_video_vs_image.png"]
CELL = re.compile(r"[+-]\d\.\d{4} ± \d\.\d{4}")


def test_quick_mode_writes_the_table_curves_and_a_plot_per_claim(tmp_path):
    out = tmp_path / "claims"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    grpo = "grpo" in PluginManager().part_types["objective"]

    text = (out / "claims.md").read_text()
    assert text in proc.stdout  # what is printed is what is written
    header = next(line for line in text.splitlines() if line.startswith("| claim |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "claim", "variant", "trained on", "steps", "sampled videos", "reward queries", "GT overall", "GT color",
        "GT direction", "GT flicker", "proxy (trained on)"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| C")]
    assert {r[0] for r in rows} == {"C1", "C2", "C3", "C4", "C5", "C6"}
    for row in rows:
        assert len(row) == 11 and row[2] in ("`vproxy.overall`", "`iproxy.overall`"), row
        assert all(CELL.fullmatch(cell) for cell in row[6:]), row  # 2 seeds: every gain has an error bar
        assert int(row[3]) >= 0 and int(row[4]) >= 0 and int(row[5]) >= 0
    assert [r[2] for r in rows if r[0] == "C6"] == ["`vproxy.overall`", "`iproxy.overall`"]
    assert any("GRPO" in r[1] for r in rows) == grpo
    assert ("GRPO skipped" in text) == (not grpo)
    assert "Curves (step: GT overall gain" in text and "Wall time" in text

    data = json.loads((out / "claims.json").read_text())
    assert data["seeds"] == 2 and len(data["rows"]) == len(rows)
    for name, curves in data["curves"].items():
        assert len(curves) == 2, name  # one curve per seed
        for curve in curves:
            assert [e["step"] for e in curve] == sorted(e["step"] for e in curve) and curve[0]["step"] == 0
            for e in curve:  # ground truth and both proxies scored at every evaluation
                assert {"toy.overall", "toy.direction", "toy.flicker", "vproxy.overall", "iproxy.overall"} <= set(e)

    for name in PLOTS:
        path = out / "plots" / name
        assert path.is_file(), name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
            labels = json.loads(image.info["Description"])
        assert labels["x"] and labels["y"], name

    # The summary can be rebuilt from the run directories alone.
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "claims.py"), "--quick", "--from-runs", "--out",
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (out / "claims.md").read_text().split("Wall time")[0] == text.split("Wall time")[0]
