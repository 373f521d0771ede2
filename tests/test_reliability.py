"""Nothing lost, nothing mixed: the run-directory lock, resume that checks the spec, damaged checkpoints and a
full disk, contracts checked where plugin output enters the core, an offline hub, and the command line."""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from vpo_core import Pair, RewardConfig, SelectorConfig, hookimpl
from vpo_core.cli import main
from vpo_core.testing import TOY_SPEC, ToyReward

ROOT = Path(__file__).resolve().parents[1]


def spec_file(tmp_path: Path, text: str = TOY_SPEC, name: str = "spec.yaml", **replace: str) -> Path:
    text = text.format(out=tmp_path / "out")
    for old, new in replace.items():
        text = text.replace(old.replace("_", " "), new)
    path = tmp_path / name
    path.write_text(text)
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "toy.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- the lock
RACER = """
import os, sys, time
from vpo_core.cli import main
from vpo_core import loop  # imported before the barrier so that both runs reach the lock together
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.0005)
sys.exit(main(["run", sys.argv[2], "--no-progress"]))
"""


def test_two_runs_racing_for_one_directory_exactly_one_runs(tmp_path):
    spec = spec_file(tmp_path)
    env = dict(os.environ, VPO_EXTRA_PLUGINS="vpo_core.testing", VPO_LOAD_PLUGINS="none", OMP_NUM_THREADS="1")
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(go), str(spec)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both are importing, then waiting at the barrier
    go.touch()
    results = [(r.wait(timeout=300), r.communicate()[1]) for r in racers]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is in use by another vpo run (pid" in loser or "already holds a run" in loser
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 6]  # one run's records, not two interleaved


def test_a_run_that_made_the_directory_but_lost_the_lock_leaves_the_winners_files(tmp_path, toy_env, capsys,
                                                                                  monkeypatch):
    """The race behind a rare failure of the test above: run A makes the directory, run B locks it first, A fails
    before its first step and used to remove the directory it made, with B's files in it."""
    from vpo_core import checkpoint

    real, winner = checkpoint.RunLock, []

    def other_run_locks_first(directory):
        winner.append(real(directory))  # run B, between A's mkdir and A's lock
        (directory / "metrics.jsonl").write_text("run B's record\n")
        return real(directory)

    monkeypatch.setattr(checkpoint, "RunLock", other_run_locks_first)
    assert main(["run", str(spec_file(tmp_path)), "--no-progress"]) == 2
    assert "is in use by another vpo run (pid" in capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == "run B's record\n"
    winner[0].release()
    # and the other way round: a directory removed between this run's mkdir and its lock is named, not a traceback
    monkeypatch.setattr(checkpoint, "RunLock", lambda directory: (directory.rmdir(), real(directory))[1])
    assert main(["run", str(spec_file(tmp_path, **{"/out": "/other"})), "--no-progress"]) == 2
    assert "was removed while this run started" in capsys.readouterr().err


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path, toy_env, capsys):
    from vpo_core.checkpoint import RunLock

    spec = spec_file(tmp_path)
    (tmp_path / "out").mkdir()
    holder = RunLock(tmp_path / "out")
    assert main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on host" in err and "started" in err
    holder.release()  # what the kernel does when the holder dies
    assert main(["run", str(spec), "--no-progress"]) == 0


# ----------------------------------------------------------------------------------------------- resume
def test_resume_with_another_spec_is_refused_then_applied_for_real(tmp_path, toy_env, capsys):
    spec = spec_file(tmp_path)
    assert main(["run", str(spec), "--no-progress", "--set", "train.steps=2"]) == 0
    capsys.readouterr()
    # steps, cadence and logging may change freely
    assert main(["run", str(spec), "--no-progress", "--resume", "--set", "train.steps=3", "--set",
                 "checkpoint.every=1"]) == 0
    changed = ["--set", "train.steps=5", "--set", "train.learning_rate=0.1", "--set", "objective.beta=7"]
    assert main(["run", str(spec), "--no-progress", "--resume", *changed]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: 0.003 -> 0.1" in err and "objective.beta: 50.0 -> 7.0" in err
    assert "--allow-spec-change" in err and "train.steps" not in err
    assert main(["run", str(spec), "--no-progress", "--resume", "--allow-spec-change", *changed]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["step"] in (3, 4, 5) and not r.get("final")] == [0.003, 0.1, 0.1]
    record = json.loads((tmp_path / "out" / "spec_changes.jsonl").read_text())
    assert record["step"] == 3 and record["before"]["train"]["learning_rate"] == 0.003
    assert record["after"]["train"]["learning_rate"] == 0.1
    assert json.loads((tmp_path / "out" / "spec.resolved.json").read_text())["objective"]["beta"] == 7.0


def test_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, toy_env, capsys):
    straight = spec_file(tmp_path, name="straight.yaml", **{"/out": "/straight"})
    assert main(["run", str(straight), "--no-progress"]) == 0
    spec = spec_file(tmp_path)
    assert main(["run", str(spec), "--no-progress", "--set", "train.steps=4"]) == 0
    damaged = tmp_path / "out" / "checkpoints" / "step-000004" / "policy.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    assert main(["run", str(spec), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-000004 is damaged" in err and "resuming from" in err and "step-000002" in err
    assert same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "out"))


def test_no_intact_checkpoint_exits_2_naming_the_files(tmp_path, toy_env, capsys):
    spec = spec_file(tmp_path)
    assert main(["run", str(spec), "--no-progress", "--set", "train.steps=4"]) == 0
    for step in ("step-000002", "step-000004"):
        (tmp_path / "out" / "checkpoints" / step / "state.json").write_text('{"step": ')
    assert main(["run", str(spec), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step-000002/state.json is damaged" in err and "Traceback" not in err


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, toy_env, capsys, monkeypatch):
    straight = spec_file(tmp_path, name="straight.yaml", **{"/out": "/straight"})
    assert main(["run", str(straight), "--no-progress"]) == 0
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, path, *args, **kwargs):  # the 2nd checkpoint dies half-way
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    spec = spec_file(tmp_path)
    assert main(["run", str(spec), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "disk full while writing checkpoint step-000004" in err and "step-000002 is intact" in err
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # nothing half-written is left
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["run", str(spec), "--no-progress", "--resume"]) == 0
    assert same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "out"))


def test_resume_hint_works_as_printed(tmp_path, toy_env):
    spec = spec_file(tmp_path, **{"steps: 6": "steps: 400", "every: 2": "every: 1000"})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vpo_core.cli", "run", str(spec), "--no-progress", "--output-dir",
           str(tmp_path / "elsewhere"), "--set", "eval.videos=0"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "elsewhere" / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        assert proc.poll() is None
        time.sleep(0.05)
    proc.terminate()
    err = proc.communicate(timeout=120)[1]
    hint = err.split("Continue with: ")[1].strip()
    assert "--output-dir" in hint and "--set eval.videos=0" in hint
    words = shlex.split(hint.replace("train.steps", "train.steps"))
    assert words[0] == "vpo-run"
    done = subprocess.run([sys.executable, "-m", "vpo_core.cli", "run", *words[1:], "--set", "train.steps=5",
                           "--no-progress"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from" in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------- contracts
class ShortRewardConfig(RewardConfig):
    differentiable: ClassVar[bool] = True
    mode: str = "short"

    def score_dimensions(self) -> list[str]:
        return ["v"]


class Misbehaving:
    """A third-party-style reward that breaks the contract in the way its config says."""

    def __init__(self, config, context):
        self.mode, self.calls = config.mode, 0

    def score(self, frames, prompts):
        self.calls += 1
        value = frames.mean(dim=(1, 2, 3, 4))
        if self.mode == "short":
            return {"v": value[:-1]}
        if self.mode == "raises":
            raise ValueError("cannot see colours")
        if self.mode == "slow":
            time.sleep(5)
        if self.mode == "nan_at_eval" and self.calls == 1:
            value = value.clone()
            value[0] = float("nan")
        return {"v": value}


class OutOfRangeSelectorConfig(SelectorConfig):
    pass


class OutOfRange:
    def __init__(self, config, context):
        pass

    def select(self, scores):
        return [Pair(0, 0, 9)]


class Plugins:
    @hookimpl
    def vpo_register_rewards(self, register):
        register("misbehaving", Misbehaving, ShortRewardConfig)

    @hookimpl
    def vpo_register_pair_selectors(self, register):
        register("out_of_range", OutOfRange, OutOfRangeSelectorConfig)


@pytest.fixture
def bad_pm(toy_pm):
    toy_pm.register_plugin(Plugins(), "badplugin")
    return toy_pm


def run(spec: Path, pm, *overrides: str):
    from vpo_core.loop import Trainer
    from vpo_core.spec import load_spec

    return Trainer(load_spec(spec, pm, list(overrides)), progress=False).run()


@pytest.mark.parametrize("reward,message", [
    ("{type: misbehaving, mode: short}", "reward 'misbehaving' from plugin 'badplugin' (badplugin): score()['v'] "
                                         "broke the contract: expected a float tensor with one score per video (4)"),
    ("{type: misbehaving, mode: raises}", "reward 'misbehaving' from plugin 'badplugin' (badplugin): score() raised "
                                          "ValueError: cannot see colours"),
    ("{type: misbehaving, mode: slow, timeout_s: 0.5}", "score() took longer than its timeout_s=0.5 s"),
])
def test_a_reward_breaking_the_contract_is_named(reward, message, tmp_path, bad_pm):
    from vpo_core.errors import RunError

    spec = spec_file(tmp_path, **{"selector:\n  type: toy_best_worst": "selector:\n  type: toy_best_worst\n  key: "
                                  "misbehaving.v"})
    with pytest.raises(RunError) as info:
        run(spec, bad_pm, f"rewards=[{reward}]")
    assert message in str(info.value) and info.value.exit_code == 1


def test_a_selector_returning_unknown_candidates_is_named(tmp_path, bad_pm):
    from vpo_core.errors import RunError

    with pytest.raises(RunError) as info:
        run(spec_file(tmp_path), bad_pm, "selector={type: out_of_range}")
    assert "selector 'out_of_range' from plugin 'badplugin'" in str(info.value)
    assert "two different candidate indices < 3" in str(info.value) and "loser=9" in str(info.value)


def test_nan_scores_at_evaluation_are_counted_not_averaged(tmp_path, bad_pm, capsys):
    spec = spec_file(tmp_path, **{"selector:\n  type: toy_best_worst": "selector:\n  type: toy_best_worst\n  key: "
                                  "misbehaving.v"})
    result = run(spec, bad_pm, "rewards=[{type: misbehaving, mode: nan_at_eval}]", "train.steps=1")
    first = json.loads((result.output_dir / "eval.jsonl").read_text().splitlines()[0])
    assert first["scores"]["misbehaving.v"][0] is None and None not in first["scores"]["misbehaving.v"][1:]
    step0 = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["eval/misbehaving.v_nan"] == 1 and step0["eval/misbehaving.v"] == step0["eval/misbehaving.v"]
    assert "1 of 4 held-out videos have no 'misbehaving.v' score" in capsys.readouterr().err
    assert "nan" not in (result.output_dir / "report.html").read_text().lower()


def test_total_weighs_every_reward_as_documented(tmp_path, toy_pm):
    from vpo_core.assembly import RewardSet
    from vpo_core.spec import load_spec

    spec = load_spec(spec_file(tmp_path), toy_pm, ["rewards=[{type: toy_brightness, name: a, weight: 2.0}, "
                                                   "{type: toy_brightness, name: b, weight: 0.5, "
                                                   "dimensions: [brightness]}]"])
    rewards = RewardSet([(part, ToyReward(part.config, None)) for part in spec.rewards])
    frames = torch.full((1, 2, 3, 4, 4), 0.25)  # brightness 0.25, smoothness 1.0
    scores = rewards.score(frames, ["x"])
    # total = 2.0 * mean(0.25, 1.0) + 0.5 * mean(0.25) = 1.25 + 0.125
    assert scores["total"].item() == pytest.approx(1.375)
    assert "total = Σ over rewards of weight × mean of that reward's dimensions" in (ROOT / "docs" / "spec.md").read_text()


# ----------------------------------------------------------------------------------------------- offline hub
HUB_SPEC = """
output_dir: {out}
policy: {{type: cogvideox, model: THUDM/CogVideoX-2b}}
rewards: [{{type: vbench_lite}}]
selector: {{type: best_worst}}
objective: {{type: dpo}}
data: {{prompts: [a cat]}}
"""


@pytest.mark.parametrize("offline_env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}],
                         ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_model_that_is_not_cached_fails_fast_without_network(offline_env, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(HUB_SPEC.format(out=tmp_path / "out"))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), **offline_env)
    for key in ("VPO_LOAD_PLUGINS", "VPO_EXTRA_PLUGINS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(key, None)
    if "HF_HUB_OFFLINE" not in offline_env:
        env.pop("HF_HUB_OFFLINE", None)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "vpo_core.cli", "run", str(spec), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    print(f"failed after {time.time() - start:.1f} s")
    assert done.returncode == 1
    assert "['THUDM/CogVideoX-2b'] are not in the local Hugging Face cache" in done.stderr
    assert "huggingface-cli download THUDM/CogVideoX-2b" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # a run that failed before its first step leaves no directory


# ----------------------------------------------------------------------------------------------- the CLI
def test_validate_many_files_one_line_each_worst_exit(tmp_path, toy_env, capsys):
    good = spec_file(tmp_path, name="good.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    missing = spec_file(tmp_path, name="missing.yaml", **{"type: toy\n": "type: nowhere\n"})
    assert main(["validate", str(good), str(bad), str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{good}: valid (online pairs; policy toy, objective toy_dpo, rewards: toy_brightness)"
    assert captured.err.startswith(f"{bad}: ") and f"\n{missing}: " in captured.err


def test_version_lists_core_and_plugins(capsys, monkeypatch):
    monkeypatch.delenv("VPO_LOAD_PLUGINS", raising=False)
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vpo-core 0.1.0" and any(line.strip().startswith("vpo-cogvideox ") for line in out)


def test_plugins_and_validate_import_no_model_code():
    """What makes `vpo plugins` and `vpo validate` answer in well under a second: every installed plugin
    registers, and the examples validate, without importing torch or any model library."""
    examples = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml"))
    code = ("import sys\nfrom vpo_core.cli import main\n"
            f"assert main(['plugins']) == 0 and main(['validate', *{examples!r}]) == 0\n"
            # a selector key no reward provides is caught from the declarations alone
            "assert main(['validate', 'examples/quickstart.yaml', '--set', 'selector.key=toy.sparkle']) == 2\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPO_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "score key(s) ['toy.sparkle'] are not provided by any reward" in done.stderr
    assert "HEAVY []" in done.stdout, done.stdout


def test_run_ends_with_a_summary(tmp_path, toy_env, capsys):
    spec = spec_file(tmp_path)
    assert main(["run", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vpo: done: 6 steps in" in out
    assert "held-out reward, before -> after, paired gain ± s.e.:" in out and "toy_brightness.brightness" in out
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out and f"tuned weights: {tmp_path / 'out' / 'final'}" in out
