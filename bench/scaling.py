"""Where a training step's time goes with 2 processes (DDP, LoRA) on the tiny CogVideoX: the model and rewards
(sampling, decoding, forward/backward, scoring), communication, and the framework itself.

    python bench/scaling.py                 # OnlineVPO, 2 processes, gloo on CPU (torchrun under the hood)
    python bench/scaling.py --steps 30 --processes 2

Each run launches the same spec three times, side by side in one invocation: on 1 process, on N processes, and on N
processes with DDP's gradient all-reduce switched off (`require_backward_grad_sync = False`, the weights then drift
apart, which does not matter for timing). Measured in-process around the calls, per step:
- model + rewards: the policy's sample/decode/denoising_loss, the rewards' score and the backward passes;
- collectives: the all-gather of the candidates' scores and the all-reduce of the step's metrics, including the
  wait for the slowest process (its sampling may take longer: on this 2-core machine the two processes do not run
  equally fast);
- framework: the rest of the step (the optimizer step included).
Gradient synchronisation is the difference of the mean backward times with and without DDP's all-reduce (the
backward pass returns once it is done); whole step times differ between launches by more than that.
Goals: framework <= 3% of a step, gradient synchronisation <= 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = """
output_dir: {out}
seed: 0
policy: {{type: cogvideox, model: {model}, num_frames: 9, height: 32, width: 32, num_inference_steps: 8,
         guidance_scale: 5.0, micro_batch_size: 8, lora: {{rank: 8, alpha: 8}}}}
rewards: [{{type: vbench_lite, dimensions: [temporal_flickering, imaging_sharpness]}}]
selector: {{type: best_worst, key: total}}
objective: {{type: dpo, beta: 500, reference_update_every: 0}}
data: {{prompts: [a red cat running, a blue car in the city, a green tree on a hill, a white bird flying]}}
train: {{steps: {steps}, prompts_per_step: 2, candidates_per_prompt: 4, learning_rate: 1.0e-4}}
eval: {{every: 0, videos: 0, max_prompts: 1, seeds_per_prompt: 1}}
checkpoint: {{every: 0}}
logging: {{trackers: []}}
"""


def worker(spec: str, report: str, no_sync: bool) -> None:
    """Runs inside each process: times the work around the model and reward calls, then trains."""
    import torch

    from vpo_core.assembly import RewardSet
    from vpo_core.loop import Trainer
    from vpo_core.plugins import PluginManager
    from vpo_core.spec import load_spec

    spent = {"work": 0.0, "collectives": 0.0, "backward": 0.0, "depth": 0}

    def timed(fn, *kinds):  # only the outermost timed call counts (sample() calls decode(), for one)
        def run(*args, **kwargs):
            spent["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["depth"] -= 1
                if not spent["depth"]:
                    for kind in kinds or ("work",):
                        spent[kind] += time.perf_counter() - start
        return run

    trainer = Trainer(load_spec(spec, PluginManager()), progress=False)
    setup = trainer._setup

    def patched_setup():
        latest = setup()
        policy = trainer.policy
        for name in ("sample", "decode", "denoising_loss"):
            setattr(policy, name, timed(getattr(policy, name)))
        trainer.accelerator.backward = timed(trainer.accelerator.backward, "work", "backward")
        for name in ("gather", "reduce"):  # the step's only collectives besides DDP's (inside backward)
            setattr(trainer.accelerator, name, timed(getattr(trainer.accelerator, name), "collectives"))
        if no_sync and trainer.world > 1:
            trainer.policy.trainable.forward_module.require_backward_grad_sync = False
        return latest

    RewardSet.score = timed(RewardSet.score)
    trainer._setup = patched_setup
    steps, train_step = [], trainer.train_step

    def step(n):
        spent.update(work=0.0, collectives=0.0, backward=0.0)
        start = time.perf_counter()
        out = train_step(n)
        steps.append((time.perf_counter() - start, spent["work"], spent["collectives"], spent["backward"]))
        return out  # (metrics, skip reason)

    trainer.train_step = step
    trainer.run()
    if trainer.main:
        Path(report).write_text(json.dumps({"steps": steps[2:], "threads": torch.get_num_threads()}))


def launch(processes: int, steps: int, no_sync: bool, tmp: Path, model: str) -> dict:
    out = tmp / f"run-{processes}-{int(no_sync)}"
    spec = tmp / f"spec-{processes}-{int(no_sync)}.yaml"
    spec.write_text(SPEC.format(out=out, model=model, steps=steps))
    report = tmp / f"report-{processes}-{int(no_sync)}.json"
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*head, __file__, "--worker", str(spec), str(report), str(int(no_sync))], env=env, check=True,
                   cwd=ROOT)
    return json.loads(report.read_text())


def summary(report: dict) -> tuple[float, float, float, float]:
    """Mean step time, model + rewards time, collectives time and backward time."""
    steps = report["steps"]
    return tuple(sum(column) / len(steps) for column in zip(*steps))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from vpo_cogvideox import build_tiny_cogvideox

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(build_tiny_cogvideox(tmp / "tiny", seed=0, max_text_length=16))
        rows = {}
        for label, processes, no_sync in (("1 process", 1, False), (f"{args.processes} processes", args.processes,
                                          False), (f"{args.processes} processes, no gradient sync",
                                                   args.processes, True)):
            rows[label] = summary(launch(processes, args.steps, no_sync, tmp, model))
    print(f"tiny CogVideoX (LoRA), OnlineVPO, {args.steps} steps (the first 2 left out), 1 thread per process\n")
    print("| run | step (ms) | model + rewards (ms) | collectives (ms) | framework (ms) | framework share |")
    print("|---|---|---|---|---|---|")
    for label, (total, work, collectives, _) in rows.items():
        framework = total - work - collectives
        print(f"| {label} | {1000 * total:.1f} | {1000 * work:.1f} | {1000 * collectives:.1f} | "
              f"{1000 * framework:.1f} | {framework / total:.1%} |")
    n = args.processes
    synced, unsynced = rows[f"{n} processes"], rows[f"{n} processes, no gradient sync"]
    sync = synced[3] - unsynced[3]
    print(f"\ngradient synchronisation: {sync / synced[0]:.1%} of a {n}-process step ({1000 * sync:.1f} ms: backward "
          f"{1000 * synced[3]:.1f} ms with DDP's all-reduce, {1000 * unsynced[3]:.1f} ms without)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
