"""Where a training step's time goes with 2 processes (DDP, LoRA) on the tiny CogVideoX: the model and rewards
(sampling, decoding, forward/backward, scoring), gradient synchronisation, and the framework itself.

    python bench/scaling.py                 # OnlineVPO, 2 processes, gloo on CPU (torchrun under the hood)
    python bench/scaling.py --steps 30 --processes 2

Each run launches the same spec twice, side by side in one invocation: once as is, and once with DDP's gradient
all-reduce switched off (`require_backward_grad_sync = False`, the weights then drift apart, which does not
matter for timing). The difference of the mean step times is the synchronisation's share; the framework's share
is a step's time minus the time spent inside the policy's sample/decode/denoising_loss, the rewards' score and
the backward passes (measured in-process around those calls). Goals: framework <= 3% of a step, sync <= 5%.
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

    spent = {"work": 0.0, "depth": 0}

    def timed(fn):  # only the outermost timed call counts (sample() calls decode(), for one)
        def run(*args, **kwargs):
            spent["depth"] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["depth"] -= 1
                if not spent["depth"]:
                    spent["work"] += time.perf_counter() - start
        return run

    trainer = Trainer(load_spec(spec, PluginManager()), progress=False)
    setup = trainer._setup

    def patched_setup():
        latest = setup()
        policy = trainer.policy
        for name in ("sample", "decode", "denoising_loss"):
            setattr(policy, name, timed(getattr(policy, name)))
        trainer.accelerator.backward = timed(trainer.accelerator.backward)
        if no_sync and trainer.world > 1:
            trainer.policy.trainable.forward_module.require_backward_grad_sync = False
        return latest

    RewardSet.score = timed(RewardSet.score)
    trainer._setup = patched_setup
    steps, train_step = [], trainer.train_step

    def step(n):
        spent["work"] = 0.0
        start = time.perf_counter()
        out = train_step(n)
        steps.append((time.perf_counter() - start, spent["work"]))
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


def summary(report: dict) -> tuple[float, float]:
    steps = report["steps"]
    total = sum(s for s, _ in steps) / len(steps)
    work = sum(w for _, w in steps) / len(steps)
    return total, work


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
    print("| run | step (ms) | model + rewards + backward (ms) | framework share |")
    print("|---|---|---|---|")
    for label, (total, work) in rows.items():
        print(f"| {label} | {1000 * total:.1f} | {1000 * work:.1f} | {(total - work) / total:.1%} |")
    synced, unsynced = rows[f"{args.processes} processes"][0], rows[f"{args.processes} processes, no gradient sync"][0]
    print(f"\ngradient synchronisation: {(synced - unsynced) / synced:.1%} of a {args.processes}-process step "
          f"({1000 * (synced - unsynced):.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
