"""The training loop: three modes, output directory, non-finite handling, resume after SIGKILL/SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from typing import ClassVar

from vpo_core import RewardConfig, hookimpl
from vpo_core.cli import main
from vpo_core.loop import Trainer
from vpo_core.spec import load_spec


def run_spec(spec: Path, pm, *overrides: str, resume: bool = False):
    resolved = load_spec(spec, pm, list(overrides))
    return Trainer(resolved, resume=resume, progress=False).run()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_online_pairs_writes_the_output_contract(toy_spec, toy_pm):
    result = run_spec(toy_spec, toy_pm)
    out = result.output_dir
    assert result.steps_done == 6 and result.exit_code == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if not r.get("final")] == list(range(7))
    trained = [r for r in rows if r["step"] > 0 and not r.get("final")]
    assert all(r["pairs"] == 2 and "objective/implicit_accuracy" in r and "loss" in r for r in trained)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000006"]  # keep_last 2
    assert (out / "final" / "toy.safetensors").exists() and (out / "final" / "spec.yaml").exists()
    assert (out / "samples" / "step-000000" / "prompt-00.gif").exists()
    assert (out / "samples" / "step-000006" / "prompt-00.gif").exists()
    assert (out / "samples" / "before_after" / "prompt-00.gif").exists()
    report = (out / "report.html").read_text()
    assert all(f"plots/{name}.png" in report for name in ("reward", "eval_curve", "eval_gain"))
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    # the resolved spec has every default filled in and is itself a valid spec
    import yaml
    resolved = yaml.safe_load((out / "final" / "spec.yaml").read_text())
    assert resolved["objective"]["beta"] == 50 and resolved["train"]["max_grad_norm"] == 1.0


def test_training_changes_weights_and_reference_update(toy_spec, toy_pm):
    result = run_spec(toy_spec, toy_pm, "objective.reference_update_every=3")
    final = load_file(str(result.output_dir / "checkpoints" / "step-000006" / "policy.safetensors"))
    net = {k: v for k, v in final.items() if k.startswith("module.")}
    ref = {k: v for k, v in final.items() if k.startswith("reference.")}
    assert net and net.keys() == {"module." + k[10:] for k in ref}
    assert all(torch.equal(net[k], ref["reference." + k[7:]]) for k in net)  # updated at step 6
    step4 = load_file(str(result.output_dir / "checkpoints" / "step-000004" / "policy.safetensors"))
    assert not torch.equal(step4["reference.out.weight"], step4["module.out.weight"])  # step 4: not yet
    assert not torch.equal(step4["reference.out.weight"], final["reference.out.weight"])


def test_rollout_mode(toy_spec, toy_pm):
    result = run_spec(toy_spec, toy_pm, "objective={type: toy_reward_gradient, last_steps: 2}",
                      "train.learning_rate=0.05", "train.steps=4")
    rows = [r for r in metrics(result.output_dir) if r["step"] > 0 and not r.get("final")]
    assert all(r["skipped"] == 0 and "reward/total" in r for r in rows)
    assert rows[-1]["reward/total"] > rows[0]["reward/total"]  # maximising brightness works


def test_offline_pairs_build_then_train(toy_spec, toy_pm, tmp_path):
    from vpo_core.data import PairDataset
    from vpo_core.offline import build_pair_dataset

    resolved = load_spec(toy_spec, toy_pm)
    pairs_dir = build_pair_dataset(resolved, tmp_path / "pairs", progress=False)
    data = PairDataset(pairs_dir)
    assert len(data) == 4  # one pair per prompt
    # resumable: a removed group is rebuilt identically, the others are kept
    group = pairs_dir / "groups" / "000002.json"
    before = group.read_text()
    group.unlink()
    build_pair_dataset(resolved, pairs_dir, progress=False)
    assert group.read_text() == before
    result = run_spec(toy_spec, toy_pm, f"data.pairs={pairs_dir}", "train.pairs_per_step=2")
    rows = [r for r in metrics(result.output_dir) if r["step"] > 0 and not r.get("final")]
    assert all(r["pairs"] == 2 and r["skipped"] == 0 for r in rows)


class NaNRewardConfig(RewardConfig):
    differentiable: ClassVar[bool] = True
    nan_steps: list[int] = []

    def score_dimensions(self) -> list[str]:
        return ["v"]


class NaNReward:
    """Returns NaN for the calls listed in nan_steps (counted per training-time call)."""
    dimensions = ("v",)
    differentiable = True

    def __init__(self, config, context):
        self.config, self.calls = config, 0

    def score(self, frames, prompts):
        self.calls += 1
        value = frames.mean(dim=(1, 2, 3, 4))
        return {"v": value * float("nan") if self.calls in self.config.nan_steps else value}


class NaNPlugin:
    @hookimpl
    def vpo_register_rewards(self, register):
        register("nan_reward", NaNReward, NaNRewardConfig)


def test_nonfinite_reward_skips_the_step(toy_spec, toy_pm):
    toy_pm.register_plugin(NaNPlugin(), "nan")
    # call 1 is the step-0 evaluation; calls 3 and 4 are training steps 2 and 3
    result = run_spec(toy_spec, toy_pm, "rewards=[{type: nan_reward, nan_steps: [3, 4]}]", "checkpoint.every=1",
                      "checkpoint.keep_last=10")
    rows = {r["step"]: r for r in metrics(result.output_dir) if not r.get("final")}
    assert rows[2]["skipped"] == 1 and rows[3]["skipped"] == 1 and rows[4]["skipped"] == 0
    assert rows[3]["skipped_nonfinite"] == 2
    ck = result.output_dir / "checkpoints"
    w1, w3 = (load_file(str(ck / f"step-00000{i}" / "policy.safetensors")) for i in (1, 3))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # weights untouched by skipped steps


def test_too_many_nonfinite_stops_with_checkpoint(toy_spec, toy_pm):
    toy_pm.register_plugin(NaNPlugin(), "nan")
    from vpo_core.errors import RunError

    with pytest.raises(RunError, match="non-finite"):
        run_spec(toy_spec, toy_pm, "rewards=[{type: nan_reward, nan_steps: [2, 3, 4, 5, 6, 7]}]",
                 "safety.max_consecutive_nonfinite=3")
    assert (toy_spec.parent / "out" / "checkpoints" / "step-000003").is_dir()


@pytest.fixture
def fp16_loss_scaler(monkeypatch):
    """What ``Accelerator(mixed_precision="fp16")`` sets up on a GPU, which accelerate refuses on CPUs: fp16
    autocast and a dynamic loss scaler. It starts at 4096, where the toy run's fp16 gradients overflow."""
    import vpo_core.loop as loop
    from accelerate.state import AcceleratorState

    build = loop.make_accelerator

    def with_scaler(resolved, output_dir):
        accelerator = build(resolved, output_dir)
        accelerator.state._mixed_precision, accelerator.native_amp = "fp16", True
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_overflow_lowers_the_loss_scale_and_resumes_with_it(toy_spec, toy_pm, fp16_loss_scaler):
    from vpo_core.report import SKIP_REASONS, terminal_summary
    from vpo_core.loop import Skip

    assert set(SKIP_REASONS) == {reason.value for reason in Skip}  # the report explains every reason
    # overflows are the scaler's routine: they do not count towards the non-finite limit
    settings = ("safety.max_consecutive_nonfinite=1", "checkpoint.every=1", "checkpoint.keep_last=10")
    result = run_spec(toy_spec, toy_pm, *settings)
    rows = {r["step"]: r for r in metrics(result.output_dir) if not r.get("final")}
    reasons = [rows[step].get("skip_reason") for step in range(1, 7)]
    assert reasons[:3] == ["fp16_overflow"] * 3 and None in reasons[3:], reasons
    overflows = reasons.count("fp16_overflow")
    assert result.counters["skipped_fp16_overflow"] == overflows == rows[6]["skipped_fp16_overflow"]
    assert result.counters["skipped_nonfinite"] == 0
    ck = result.output_dir / "checkpoints"
    w1, w3 = (load_file(str(ck / f"step-00000{i}" / "policy.safetensors")) for i in (1, 3))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # the scaler skipped the updates
    scales = [json.loads((ck / f"step-00000{i}" / "state.json").read_text())["loss_scaler"]["scale"]
              for i in range(1, 7)]
    assert scales[:3] == [2048.0, 1024.0, 512.0]  # halved at each overflow
    assert "overflowed in fp16" in terminal_summary(result)
    assert "overflowed in fp16" in (result.output_dir / "report.html").read_text()
    # resumed at step 3 with the scale it had reached (a fresh scaler would overflow again at step 4)
    resumed_spec = toy_spec.parent / "resumed.yaml"
    resumed_spec.write_text(toy_spec.read_text().replace(str(toy_spec.parent / "out"), str(toy_spec.parent / "r")))
    run_spec(resumed_spec, toy_pm, *settings, "train.steps=3")
    resumed = run_spec(resumed_spec, toy_pm, *settings, resume=True)
    assert resumed.counters == result.counters
    final, again = (load_file(str(out / "checkpoints" / "step-000006" / "policy.safetensors"))
                    for out in (result.output_dir, resumed.output_dir))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_existing_output_needs_resume(toy_spec, toy_env, capsys):
    assert main(["run", str(toy_spec), "--no-progress", "--set", "train.steps=2"]) == 0
    out = toy_spec.parent / "out"
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", str(toy_spec), "--no-progress", "--set", "train.steps=2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost


def _spawn(spec: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, VPO_EXTRA_PLUGINS="vpo_core.testing", VPO_LOAD_PLUGINS="none", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vpo_core.cli", "run", str(spec), "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run has checkpointed ``step`` (or later)."""
    from vpo_core.checkpoint import list_checkpoints

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list_checkpoints(out)
        if found and int(found[-1].name[5:]) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("run did not reach the step in time")


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "toy.safetensors"))


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, seed):
    from vpo_core.testing import TOY_SPEC

    steps = 30
    specs = {}
    for name in ("full", "killed"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(TOY_SPEC.format(out=tmp_path / name).replace("steps: 6", f"steps: {steps}")
                        .replace("every: 2", "every: 1"))
        specs[name] = path
    full = _spawn(specs["full"])
    assert full.wait(timeout=300) == 0, full.communicate()
    rng = random.Random(seed)
    kill_after = rng.randint(2, steps // 2)
    proc = _spawn(specs["killed"])
    _wait_for_step(tmp_path / "killed", kill_after, proc)
    time.sleep(rng.uniform(0, 0.2))  # anywhere in the following step(s), possibly mid-checkpoint
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _spawn(specs["killed"], "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged[:-1] == list(range(steps + 1))  # no duplicated or missing step after resume (+ final)


def test_sigterm_finishes_step_saves_and_resumes(tmp_path):
    from vpo_core.testing import TOY_SPEC

    path = tmp_path / "spec.yaml"
    path.write_text(TOY_SPEC.format(out=tmp_path / "out").replace("steps: 6", "steps: 400")
                    .replace("every: 2", "every: 1000"))
    proc = _spawn(path)
    deadline = time.time() + 120
    while not (tmp_path / "out" / "metrics.jsonl").exists() or len(
            (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    saved = sorted((tmp_path / "out" / "checkpoints").iterdir())
    assert len(saved) == 1
    step = int(saved[0].name[5:])
    last_logged = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last_logged == step  # the step in flight was finished and saved


def test_bf16_gradient_accumulation_and_schedule(toy_spec, toy_pm):
    result = run_spec(toy_spec, toy_pm, "train.mixed_precision=bf16", "train.gradient_accumulation_steps=2",
                      "train.lr_scheduler=linear", "train.warmup_steps=2", "train.steps=4")
    rows = [r for r in metrics(result.output_dir) if r["step"] > 0 and not r.get("final")]
    assert all(r["skipped"] == 0 and r["pairs"] == 4 for r in rows)  # 2 micro-steps x 2 prompts
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up, then linear decay


def test_unknown_score_key_fails_before_sampling(toy_spec, toy_env, capsys):
    assert main(["run", str(toy_spec), "--no-progress", "--set", "selector.key=toy_brightness.loudness"]) == 2
    err = capsys.readouterr().err
    assert "toy_brightness.loudness" in err and "toy_brightness.brightness" in err and "Traceback" not in err
    assert not (toy_spec.parent / "out" / "metrics.jsonl").exists()
