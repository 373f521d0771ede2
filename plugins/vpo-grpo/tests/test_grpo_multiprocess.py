"""GRPO's trajectory mode on 2 processes (gloo on CPU, the toy policy), under DDP and FSDP2: each process samples its
share of the step's prompt groups, advantages with the global std use every process's scores, the transitions
trained are counted over every process, the steps trained are drawn per trajectory; the run ends with the same
weights and statistics as on 1 process, also when an objective chooses no transition on a process or on any."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from vpo_core.testing import TOY_SPEC, launch_run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

# random half of each trajectory's steps, two updates per batch, a KL term to the frozen reference
SPEC = TOY_SPEC.replace("selector:\n  type: toy_best_worst\n", "").replace(
    "objective:\n  type: toy_dpo\n  beta: 50\n",
    "objective: {{type: grpo, noise_level: 1.0, clip_range: 0.2, timestep_fraction: 0.5, inner_epochs: 2, "
    "std: global, kl_beta: 0.1, rewards: {{toy_brightness.brightness: 1.0}}}}\n")


# Trains only the even prompt groups (the second process's share has none), and nothing at all on odd steps: as an
# objective that drops groups whose rewards tie (DAPO's dynamic sampling) may.
FILTERING = '''
from dataclasses import replace
from vpo_core import hookimpl
from vpo_grpo import GRPOConfig, GRPOObjective

class Filtering(GRPOObjective):
    def expand(self, batch, ctx):
        out = super().expand(batch, ctx)
        keep = [k for k, row in enumerate(out.rows) if batch.groups[row] % 2 == 0 and ctx.step % 2 == 0]
        return replace(out, rows=[out.rows[k] for k in keep], steps=[out.steps[k] for k in keep],
                       advantages=out.advantages[keep])

@hookimpl
def vpo_register_objectives(register):
    register("filtering_grpo", Filtering, GRPOConfig)
'''


def weights(directory, step):
    return load_file(str(directory / "checkpoints" / f"step-{step:06d}" / "policy.safetensors"))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_no_transition_on_a_process_or_on_any(tmp_path, fsdp):
    (tmp_path / "filtering_grpo.py").write_text(FILTERING)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("type: grpo,", "type: filtering_grpo,").format(out=tmp_path / "unused"))
    args = ("--set", "train.steps=4", "--set", "train.learning_rate=3.0e-5")
    env = {"VPO_LOAD_PLUGINS": "grpo", "VPO_EXTRA_PLUGINS": "vpo_core.testing,filtering_grpo"}
    one = launch_run(spec, tmp_path / "one", 1, *args, **env, timeout=120)
    two = launch_run(spec, tmp_path / "two", 2, *args, **env, **({"ACCELERATE_USE_FSDP": "true"} if fsdp else {}),
                     timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skip_reason") for r in rows if r["step"] and not r.get("final")] == \
        ["no_transitions", None, "no_transitions", None]
    a, b = weights(tmp_path / "one", 4), weights(tmp_path / "two", 4)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert any(not torch.equal(weights(tmp_path / "one", 2)[k], a[k]) for k in a if k.startswith("module."))
    assert "had no transition to train" in (tmp_path / "two" / "report.html").read_text()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, fsdp):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "unused"))
    args = ("--set", "train.steps=3", "--set", "train.candidates_per_prompt=4", "--set",
            "train.learning_rate=3.0e-5")  # ratios stay near 1: some clipped, most not
    one = launch_run(spec, tmp_path / "one", 1, *args, VPO_LOAD_PLUGINS="grpo")
    two = launch_run(spec, tmp_path / "two", 2, *args, VPO_LOAD_PLUGINS="grpo",
                     **({"ACCELERATE_USE_FSDP": "true"} if fsdp else {}))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    checkpoint = "checkpoints/step-{:06d}/policy.safetensors"
    a, b = (load_file(str(tmp_path / n / checkpoint.format(3))) for n in ("one", "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)  # measured: 6e-8
    before = load_file(str(tmp_path / "one" / checkpoint.format(2)))
    assert any(not torch.equal(before[k], a[k]) for k in a if k.startswith("module."))  # step 3 trained
    rows = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")]
    trained = [[r for r in runs if r["step"] and not r.get("final")] for runs in rows]
    assert len(trained[0]) == len(trained[1]) == 3 and all(r["skipped"] == 0 for r in trained[1])
    for x, y in zip(*trained):
        for key in ("loss", "objective/approx_kl", "objective/kl", "reward/toy_brightness.brightness"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), key  # loss: a sum of O(1) terms near 0
