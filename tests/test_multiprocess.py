"""More than one process (gloo on CPU, launched with torchrun): the result does not depend on the process count,
only the main process writes, resume works across process counts, a crash on one rank ends the run, SIGTERM to the
launcher stops every process after a checkpoint."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpo_core.testing import TOY_SPEC, launch_run, start_run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

CRASHING_REWARD = '''
import os
from typing import ClassVar
from vpo_core import RewardConfig, hookimpl

class Config(RewardConfig):
    differentiable: ClassVar[bool] = True
    def score_dimensions(self):
        return ["v"]

class Crashing:
    def __init__(self, config, context):
        self.calls = 0
    def score(self, frames, prompts):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 3:
            raise RuntimeError("sensor on fire")
        return {"v": frames.mean(dim=(1, 2, 3, 4))}

@hookimpl
def vpo_register_rewards(register):
    register("crashing", Crashing, Config)
'''


# Pairs for every prompt but the step's last: with 4 prompts, the first process gets 2 pairs, the second 1.
UNEVEN_SELECTOR = '''
from vpo_core import hookimpl
from vpo_core.testing import ToySelector, ToySelectorConfig

class AllButLast(ToySelector):
    def select(self, scores):
        return [pair for pair in super().select(scores) if pair.prompt_index < scores["total"].shape[0] - 1]

@hookimpl
def vpo_register_pair_selectors(register):
    register("all_but_last", AllButLast, ToySelectorConfig)
'''


def toy_spec(tmp_path: Path, text: str = TOY_SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text.format(out=tmp_path / "unused"))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=0, msg=k)


def evals(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_ddp_two_processes_equal_one_and_only_the_main_process_writes(tmp_path):
    spec = toy_spec(tmp_path)
    one, two = launch_run(spec, tmp_path / "one", 1), launch_run(spec, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert_same_weights(tmp_path / "one" / "final" / "toy.safetensors", tmp_path / "two" / "final" / "toy.safetensors")
    # the held-out evaluation is split over the processes and gathered: the same records as one process
    for a, b in zip(evals(tmp_path / "one"), evals(tmp_path / "two"), strict=True):
        assert a["prompts"] == b["prompts"] and a["seeds"] == b["seeds"]
        for k in a["scores"]:
            torch.testing.assert_close(torch.tensor(a["scores"][k]), torch.tensor(b["scores"][k]), atol=1e-5, rtol=0)
    # one writer: one metrics record per step, one eval record per evaluation, one done line
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]
    assert len(evals(tmp_path / "two")) == 2 and two.stdout.count("vpo: done") == 1
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in two.stderr  # torchrun's 30 s to stop are plenty here
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_bf16_with_ddp_computes_as_one_process(tmp_path):
    # accelerate's DDP preparation patches autocast and float32 outputs into the module's forward; kept, sampling
    # ran in bf16 on 2 processes only (measured: held-out scores 1.6e-3 apart before training, weights 5.9e-3)
    spec = toy_spec(tmp_path)
    runs = [launch_run(spec, tmp_path / str(n), n, "--set", "train.mixed_precision=bf16") for n in (1, 2)]
    assert all(run.returncode == 0 for run in runs), runs[1].stderr
    before = [evals(tmp_path / str(n))[0]["scores"] for n in (1, 2)]
    assert before[0].keys() == before[1].keys()
    for k in before[0]:
        torch.testing.assert_close(torch.tensor(before[0][k]), torch.tensor(before[1][k]), atol=1e-6, rtol=0)
    a, b = (load_file(str(tmp_path / str(n) / "final" / "toy.safetensors")) for n in (1, 2))
    for k in a:  # bf16 rounding differs with the batch's split (also within one process), and Adam magnifies it
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0, msg=k)  # measured: 1.6e-4


def test_rollout_mode_with_ddp_equals_one_process(tmp_path):
    spec = toy_spec(tmp_path)
    args = ("--set", "objective={type: toy_reward_gradient, last_steps: 2}", "--set", "train.steps=3",
            "--set", "train.learning_rate=0.05")
    one, two = launch_run(spec, tmp_path / "one", 1, *args), launch_run(spec, tmp_path / "two", 2, *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert_same_weights(tmp_path / "one" / "final" / "toy.safetensors", tmp_path / "two" / "final" / "toy.safetensors")


def test_fsdp2_equals_one_process_and_resumes_on_another_process_count(tmp_path):
    # evaluations at the checkpoint steps: sampling without a backward pass leaves FSDP2's root module gathered, so
    # the optimizer's sharded parameters were not the module's and the checkpoint failed (KeyError while saving)
    spec = toy_spec(tmp_path, TOY_SPEC.replace("eval:\n", "eval:\n  every: 2\n"))
    one = launch_run(spec, tmp_path / "one", 1)
    sharded = launch_run(spec, tmp_path / "two", 2, ACCELERATE_USE_FSDP="true")
    assert one.returncode == 0 and sharded.returncode == 0, sharded.stderr
    assert_same_weights(tmp_path / "one" / "final" / "toy.safetensors", tmp_path / "two" / "final" / "toy.safetensors")
    assert [e["step"] for e in evals(tmp_path / "two")] == [0, 2, 4, 6]
    for a, b in zip(evals(tmp_path / "one"), evals(tmp_path / "two"), strict=True):
        for k in a["scores"]:
            torch.testing.assert_close(torch.tensor(a["scores"][k]), torch.tensor(b["scores"][k]), atol=1e-5, rtol=0)
    # 4 steps sharded over 2 processes, then resumed on 1: the checkpoint is consolidated, the trajectory the same
    first = launch_run(spec, tmp_path / "mixed", 2, "--set", "train.steps=4", ACCELERATE_USE_FSDP="true")
    assert first.returncode == 0, first.stderr
    resumed = launch_run(spec, tmp_path / "mixed", 1, "--resume")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert_same_weights(tmp_path / "one" / "final" / "toy.safetensors",
                        tmp_path / "mixed" / "final" / "toy.safetensors")


def test_fsdp2_checkpoints_after_a_step_without_pairs(tmp_path):
    # nothing trains (no candidates this far apart), so no backward pass reshards the root before the checkpoint
    untrained = launch_run(toy_spec(tmp_path), tmp_path / "no-pairs", 2, "--set", "selector.min_gap=10", "--set",
                           "train.steps=2", ACCELERATE_USE_FSDP="true")
    assert untrained.returncode == 0, untrained.stderr
    assert (tmp_path / "no-pairs" / "checkpoints" / "step-000002").is_dir()


def test_a_plugin_raising_before_the_first_step_leaves_its_traceback(tmp_path):
    # the run removes the output directory it made (nothing was trained), so the traceback goes to the temp dir
    first_call = CRASHING_REWARD.replace('os.environ.get("RANK") == "1" and self.calls == 3', "True")
    (tmp_path / "crashing_reward.py").write_text(first_call)
    spec = toy_spec(tmp_path, TOY_SPEC.replace("  - type: toy_brightness", "  - type: crashing"))
    done = launch_run(spec, tmp_path / "out", 1, "--set", "data.eval_prompts=[]",
                      VPO_EXTRA_PLUGINS="vpo_core.testing,crashing_reward", TMPDIR=str(tmp_path))
    assert done.returncode == 1 and not (tmp_path / "out").exists()
    log = Path(re.search(r"traceback in (\S+)\)", done.stderr).group(1))
    assert log.parent == tmp_path
    assert "Traceback" not in done.stderr and "sensor on fire" in done.stderr
    assert 'raise RuntimeError("sensor on fire")' in log.read_text()


def test_a_crash_on_one_rank_ends_every_rank_naming_it(tmp_path):
    (tmp_path / "crashing_reward.py").write_text(CRASHING_REWARD)
    spec = toy_spec(tmp_path, TOY_SPEC.replace("  - type: toy_brightness", "  - type: crashing"))
    done = launch_run(spec, tmp_path / "out", 2, VPO_EXTRA_PLUGINS="vpo_core.testing,crashing_reward")
    assert done.returncode != 0
    assert "vpo [rank 1]: reward 'crashing'" in done.stderr and "sensor on fire" in done.stderr
    # each process's line whole (under torchrun's `python -u`, print writes a line's end apart), each traceback
    # in its own file
    assert all(line.count("vpo [rank") == 1 for line in done.stderr.splitlines() if "vpo [rank" in line)
    assert "sensor on fire" in (tmp_path / "out" / "error-rank1.log").read_text()


def test_sigterm_to_the_launcher_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    spec = toy_spec(tmp_path, TOY_SPEC.replace("steps: 6", "steps: 400").replace("every: 2", "every: 1000"))
    launcher = start_run(spec, tmp_path / "out", 2)
    metrics, deadline = tmp_path / "out" / "metrics.jsonl", time.time() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:  # trains (the record of step 2)
        assert time.time() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to each process
    _, stderr = launcher.communicate(timeout=120)
    assert stderr.count("vpo: received SIGTERM") == 2  # both processes
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert saved == [f"step-{step:06d}"] and 2 <= step < 400  # the step in flight finished everywhere, then saved
    assert f"vpo: stopped after step {step}; checkpoint saved" in stderr and "--resume" in stderr
    # a launcher that would kill the processes at once after a stop signal: it is said, once
    resumed = launch_run(spec, tmp_path / "out", 2, "--resume", "--set", f"train.steps={step + 1}",
                         TORCH_ELASTIC_SHUTDOWN_TIMEOUT="0")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert resumed.stderr.count("set TORCH_ELASTIC_SHUTDOWN_TIMEOUT=") == 1
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [*range(step + 2), step + 1]


def test_build_pairs_on_two_processes_equals_one(tmp_path):
    spec = toy_spec(tmp_path)
    prompts = ("--set", "data.prompts=[a red ball, a blue cube, a green cone, a dark sky, a cat]")  # 3 + 2 groups
    one, two = (launch_run(spec, tmp_path / str(n), n, *prompts, command=("build-pairs",)) for n in (1, 2))
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout.count("pair dataset written") == 1
    files = [sorted(p.name for p in (tmp_path / str(n) / "groups").iterdir()) for n in (1, 2)]
    assert files[0] == files[1] and len(files[0]) == 10  # a .json and a .safetensors per prompt, nothing left over
    for name in files[0]:
        a, b = (tmp_path / "1" / "groups" / name, tmp_path / "2" / "groups" / name)
        if name.endswith(".json"):
            ga, gb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ga["seeds"] == gb["seeds"] and ga["pairs"] == gb["pairs"]
            for k in ga["scores"]:
                assert ga["scores"][k] == pytest.approx(gb["scores"][k], abs=1e-6)
        else:
            torch.testing.assert_close(load_file(str(a))["latents"], load_file(str(b))["latents"], atol=1e-6, rtol=0)
