"""The seeds' claims in miniature, on the toy world, with several seeds and error bars.

C1  online vs offline DPO at the same number of sampled videos         (OnlineVPO, Table 6d)
C2  curriculum reference update vs a fixed reference                   (OnlineVPO, Fig. 5)
C3  N=2 vs N=4 candidates per prompt                                   (OnlineVPO, Table 8a)
C4  VADER reward-gradient vs DPO: held-out reward per reward query     (VADER, Fig. 7)

Every variant starts from examples/quickstart.yaml (OnlineVPO on the shipped toy CogVideoX) and changes only
what the claim is about. The score is the held-out toyworld reward (`toy.overall`, ground truth from the
prompt) after training, as mean ± standard error over seeds; "gain" is after minus before on the same
held-out prompts and seeds. Usage:

    python bench/claims.py                 # defaults: 3 seeds, 40 steps (about 15 min on 2 CPU cores)
    python bench/claims.py --seeds 2 --steps 10 --out runs/claims-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE_SPEC = ROOT / "examples" / "quickstart.yaml"
KEY = "toy.overall"


def mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def heldout_curve(out: Path) -> list[tuple[int, float]]:
    """(step, mean held-out KEY score) of every evaluation of a run."""
    curve = []
    for line in (out / "eval.jsonl").read_text().splitlines():
        rec = json.loads(line)
        values = rec["scores"][KEY]
        curve.append((rec["step"], sum(values) / len(values)))
    return curve


def run_variant(pm, out: Path, overrides: list[str]) -> list[tuple[int, float]]:
    from vpo_core import Trainer, load_spec

    if out.exists():
        shutil.rmtree(out)
    resolved = load_spec(BASE_SPEC, pm, overrides + [f"output_dir={out}"])
    Trainer(resolved, progress=False).run()
    return heldout_curve(out)


def offline_pairs(pm, out: Path, seed: int, common: list[str], count: int) -> Path:
    """A pair dataset from the base policy with the online run's video budget: `count` prompt draws x N."""
    from vpo_core import build_pair_dataset, derive_seed, load_spec, read_prompts

    resolved = load_spec(BASE_SPEC, pm, common)
    prompts = read_prompts(resolved.spec.data.prompts, resolved.spec.data.prompts_file)
    g = torch.Generator().manual_seed(derive_seed(seed, "offline-prompts"))
    drawn = [prompts[int(i)] for i in torch.randint(len(prompts), (count,), generator=g)]
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out.parent / f"{out.name}-prompts.txt"
    prompt_file.write_text("\n".join(drawn) + "\n")
    resolved = load_spec(BASE_SPEC, pm, common + [f"data.prompts_file={prompt_file}", "data.prompts=[]"])
    return build_pair_dataset(resolved, out, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts used (x2 seeds each)")
    parser.add_argument("--vader-lr", type=float, default=None, help="learning rate of the VADER variant")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "claims")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", 2)))

    from vpo_core import PluginManager, load_spec

    pm = PluginManager()
    base = load_spec(BASE_SPEC, pm)
    p, n = base.spec.train.prompts_per_step, base.spec.train.candidates_per_prompt
    k = base.objective.config.reference_update_every
    steps = args.steps
    every = max(1, steps // n)  # so DPO is evaluated at VADER's final reward-query budget (C4)
    common = [f"train.steps={steps}", f"eval.every={every}", "eval.videos=0", "checkpoint.every=0",
              f"eval.max_prompts={args.eval_prompts}", "logging.trackers=[]"]
    curriculum_k = k if k and k < steps else max(1, steps // 4)
    vader_lr = args.vader_lr or base.spec.train.learning_rate
    variants = {
        "online_dpo": [f"objective.reference_update_every={curriculum_k}"],
        "offline_dpo": [f"objective.reference_update_every={curriculum_k}", f"train.pairs_per_step={p}"],
        "fixed_reference": ["objective.reference_update_every=0"],
        "n2": [f"objective.reference_update_every={curriculum_k}", "train.candidates_per_prompt=2"],
        "vader": ["objective={type: reward_gradient, cutoff: last, frames: all, rewards: {%s: {mode: maximize}}}" % KEY,
                  f"train.learning_rate={vader_lr}"],
    }
    selected = args.only or list(variants)
    results: dict[str, list[list[tuple[int, float]]]] = {v: [] for v in selected}
    started = time.time()
    for seed in range(args.seeds):
        for name in selected:
            t0 = time.time()
            overrides = common + [f"seed={seed}"] + variants[name]
            out = args.out / f"{name}-seed{seed}"
            if name == "offline_dpo":
                pairs = offline_pairs(pm, args.out / f"pairs-seed{seed}", seed, common + [f"seed={seed}"], steps * p)
                overrides.append(f"data.pairs={pairs}")
            results[name].append(run_variant(pm, out, overrides))
            print(f"[{time.time() - started:6.0f}s] {name} seed {seed}: {results[name][-1][-1][1]:.4f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    queries_per_step = {"vader": p, "n2": p * 2}
    summary = {}
    for name, curves in results.items():
        finals = [c[-1][1] for c in curves]
        gains = [c[-1][1] - c[0][1] for c in curves]
        per_step = queries_per_step.get(name, p * n)
        summary[name] = {"final": mean_sem(finals), "gain": mean_sem(gains), "videos": steps * per_step,
                         "curves": curves, "queries_per_step": per_step}
    if "vader" in summary and "online_dpo" in summary:
        budget = steps * p  # VADER's reward queries at the end
        at_budget = [dict(c)[budget // (p * n)] - c[0][1] for c in results["online_dpo"] if budget // (p * n) in dict(c)]
        if at_budget:
            summary["online_dpo@vader_budget"] = {"gain": mean_sem(at_budget), "videos": budget}
    (args.out / "claims.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                      "summary": summary}, indent=1, default=str))
    print_table(summary, args.seeds, steps)
    return 0


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:+.4f} ± {ms[1]:.4f}" if not math.isnan(ms[1]) else f"{ms[0]:+.4f}"


def print_table(summary: dict, seeds: int, steps: int) -> None:
    rows = [
        ("C1", "online DPO (OnlineVPO)", "online_dpo"), ("C1", "offline DPO, same #videos", "offline_dpo"),
        ("C2", "curriculum reference", "online_dpo"), ("C2", "fixed reference", "fixed_reference"),
        ("C3", "N=4 candidates", "online_dpo"), ("C3", "N=2 candidates", "n2"),
        ("C4", "VADER reward gradient", "vader"), ("C4", "DPO at VADER's query budget", "online_dpo@vader_budget"),
        ("C4", "DPO at its full budget", "online_dpo"),
    ]
    print(f"\nHeld-out {KEY} gain (after - before), mean ± s.e. over {seeds} seeds, {steps} steps\n")
    print("| claim | variant | held-out gain | final held-out | sampled videos / reward queries |")
    print("|---|---|---|---|---|")
    for claim, label, key in rows:
        if key not in summary:
            continue
        s = summary[key]
        final = fmt(s["final"]).lstrip("+") if "final" in s else "—"
        print(f"| {claim} | {label} | {fmt(s['gain'])} | {final} | {s['videos']} |")


if __name__ == "__main__":
    sys.exit(main())
