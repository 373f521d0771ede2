"""VideoDPO on 2 processes (gloo on CPU, the toy policy): `vpo videodpo build-pairs` shares the sampling and writes
the same dataset as 1 process; re-weighted DPO on it takes each micro-step's pairs in halves and ends with the same
weights and statistics as on 1 process."""

from __future__ import annotations

import json

import pytest
import torch
import vpo_core.testing
from safetensors.torch import load_file
from vpo_core.plugins import PluginManager
from vpo_core.spec import load_spec
from vpo_core.testing import launch_run

import vpo_videodpo.plugin
from vpo_videodpo.build import build_videodpo_pairs

# OmniScore over two toy dimensions, the smallest quarter of the gaps dropped dataset-wide, weights with alpha 1
SPEC = """\
output_dir: {out}
seed: 1
policy: {{type: toy, frames: 3, size: 4, steps: 2}}
rewards: [{{type: toy_brightness, name: toy}}]
selector: {{type: omniscore, quality: {{toy.brightness: {{}}, toy.smoothness: {{weight: 2}}}}, semantic: {{}},
           keep_top_fraction: 0.75, alpha: 1.0}}
objective: {{type: videodpo_dpo, beta: 50}}
data: {{prompts: [a red ball, a blue cube, a green cone, a dark sky, a cat, a dog, a tree, a car]}}
train: {{steps: 3, candidates_per_prompt: 3, pairs_per_step: 2, gradient_accumulation_steps: 2,
        learning_rate: 0.003}}
eval: {{videos: 0, seeds_per_prompt: 1}}
checkpoint: {{every: 2}}
logging: {{trackers: []}}
"""

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


def test_two_processes_equal_one(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "unused"))
    pm = PluginManager(load_entrypoints=False)
    pm.register_plugin(vpo_core.testing, "toy")
    pm.register_plugin(vpo_videodpo.plugin, "videodpo")
    build_videodpo_pairs(load_spec(spec, pm), tmp_path / "pairs", progress=False)
    built = launch_run(spec, tmp_path / "pairs-2", 2, command=("videodpo", "build-pairs"), VPO_LOAD_PLUGINS="videodpo")
    assert built.returncode == 0 and built.stdout.count("pairs from 8 prompts") == 1, built.stderr
    meta = [json.loads((tmp_path / d / "meta.json").read_text())["videodpo"] for d in ("pairs", "pairs-2")]
    assert meta[0] == meta[1] and meta[0]["pairs"] == 6
    for group in sorted((tmp_path / "pairs" / "groups").glob("*.json")):
        a, b = json.loads(group.read_text()), json.loads((tmp_path / "pairs-2" / "groups" / group.name).read_text())
        assert a["pairs"] == b["pairs"] and a["omniscore"] == pytest.approx(b["omniscore"], abs=1e-6)
    args = ("--set", f"data.pairs={tmp_path / 'pairs-2'}")
    one, two = (launch_run(spec, tmp_path / str(n), n, *args, VPO_LOAD_PLUGINS="videodpo") for n in (1, 2))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    checkpoint = "checkpoints/step-{:06d}/policy.safetensors"
    a, b = (load_file(str(tmp_path / str(n) / checkpoint.format(3))) for n in (1, 2))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)  # measured: 3e-8
    before = load_file(str(tmp_path / "1" / checkpoint.format(2)))
    assert any(not torch.equal(before[k], a[k]) for k in a if k.startswith("module."))  # step 3 trained
    rows = [[json.loads(line) for line in (tmp_path / str(n) / "metrics.jsonl").read_text().splitlines()]
            for n in (1, 2)]
    trained = [[r for r in runs if r["step"] and not r.get("final")] for runs in rows]
    assert len(trained[0]) == len(trained[1]) == 3
    for x, y in zip(*trained):
        assert x["pairs"] == y["pairs"] == 4
        for key in ("loss", "objective/implicit_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
