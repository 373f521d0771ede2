"""The seeds' claims in miniature, tested honestly: train on a learned proxy reward, judge on the ground truth.

Real runs train on a learned reward (VideoScore, HPS) that only approximates what people want. Here every
variant trains on one of the toy world's learned proxies (`toyworld_video_proxy`, `toyworld_image_proxy`,
contrib/vpo-toyworld) and is judged by the ground truth (`toyworld`, known from the prompt) on the held-out
prompts, with the proxy's own held-out score beside it:

C1  online vs offline DPO at the same number of sampled videos, over a long horizon   (OnlineVPO, Table 6d)
C2  curriculum reference update every K steps, several K, vs a fixed reference        (OnlineVPO, Fig. 5)
C3  N = 2 / 4 / 8 candidates per prompt at an equal number of sampled videos          (OnlineVPO, Table 8a)
C4  reward gradient (VADER) vs DPO vs GRPO: ground truth reached per reward query     (VADER, Fig. 7)
C5  reward hacking: proxy and ground truth over a long run, VADER and OnlineVPO       (OnlineVPO, ReFL collapse)
C6  video vs image feedback: OnlineVPO on the video proxy vs the image proxy, ground-truth direction (motion) and
    flicker separately                                                                (OnlineVPO's main argument)

Every variant starts from examples/quickstart.yaml (OnlineVPO on the shipped toy CogVideoX: 4 prompts x 4
candidates per step, lr 1e-3, reference update every 25 steps) and changes only what the claim is about; the
spec scores all three rewards, and only the selector key / objective keys say which one trains. Numbers are
held-out gains (score at a step minus the score before training, on the same held-out prompts and noise), mean
± standard error over seeds. Writes claims.md (table and curves), claims.json and plots/C*.png under --out.

    python bench/claims.py                  # the full run: 3 seeds, one run per core at a time, one thread each
    python bench/claims.py --quick          # the structure in about a minute (CI); numbers mean nothing
    python bench/claims.py --only online vader   # some variants (finished runs in --out are reused)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from vpo_core.report import mean_sem

ROOT = Path(__file__).resolve().parents[1]
BASE_SPEC = ROOT / "examples" / "quickstart.yaml"
GT_KEYS = ("toy.overall", "toy.color", "toy.direction", "toy.flicker")
REWARDS = ("rewards=[{type: toyworld, name: toy}, {type: toyworld_video_proxy, name: vproxy}, "
           "{type: toyworld_image_proxy, name: iproxy}]")
VIDEO_PROXY, IMAGE_PROXY = "vproxy.overall", "iproxy.overall"
# GRPO as tuned in examples/grpo-toyworld.yaml: G = 8 trajectories per prompt, DDIM eta 1, only denoising steps
# 0-2 stochastic and trained, lr 3e-4 (1e-3 drifts back on this world; plugins/vpo-grpo/README.md).
GRPO_GROUP = 8
GRPO = ["objective={type: grpo, noise_level: 1.0, sde_window: [0, 3], timestep_fraction: 1.0, clip_range: 1.0e-4, "
        "rewards: {%s: 1.0}}" % VIDEO_PROXY, f"train.candidates_per_prompt={GRPO_GROUP}", "train.learning_rate=3.0e-4"]
VADER = ("objective={type: reward_gradient, cutoff: last, frames: all, rewards: {%s: {mode: maximize}}}"
         % VIDEO_PROXY)


@dataclass
class Variant:
    name: str
    steps: int
    overrides: list[str]
    trained_on: str = VIDEO_PROXY
    videos_per_step: int = 0  # sampled videos (offline: sampled before training, counted per step consumed)
    queries_per_step: int = 0  # reward calls on a video
    offline_pairs_per_step: int = 0  # > 0: offline DPO on pairs the base policy sampled before training


@dataclass
class Settings:
    seeds: int = 3
    long: int = 150  # C1, C5 (and the reference OnlineVPO run all claims share)
    mid: int = 75  # C2, C3, C6, GRPO (GRPO samples 8 per prompt: 75 steps = the long online run's videos)
    vader: int = 400  # C4/C5: VADER queries 4x fewer rewards per step than online DPO
    every: int = 25
    eval_prompts: int = 32  # all held-out prompts, one seed each
    extra: list[str] = field(default_factory=list)


FULL = Settings()
QUICK = Settings(seeds=2, long=4, mid=2, vader=4, every=2, eval_prompts=2,
                 extra=["policy.num_inference_steps=2", "train.prompts_per_step=2"])


def variants(s: Settings, p: int, n: int, k: int, grpo: bool) -> dict[str, Variant]:
    v = p * n  # sampled videos per step, kept equal across C3
    out = {
        "online": Variant("online", s.long, [], videos_per_step=v, queries_per_step=v),
        "offline": Variant("offline", s.long, [f"train.pairs_per_step={p}"], videos_per_step=v, queries_per_step=v,
                           offline_pairs_per_step=p),
        "k_small": Variant("k_small", s.mid, [f"objective.reference_update_every={max(1, k * 2 // 5)}"],
                           videos_per_step=v, queries_per_step=v),
        "k_large": Variant("k_large", s.mid, [f"objective.reference_update_every={2 * k}"], videos_per_step=v,
                           queries_per_step=v),
        "fixed": Variant("fixed", s.mid, ["objective.reference_update_every=0"], videos_per_step=v,
                         queries_per_step=v),
        "n2": Variant("n2", s.mid, [f"train.prompts_per_step={v // 2}", "train.candidates_per_prompt=2"],
                      videos_per_step=v, queries_per_step=v),
        "n8": Variant("n8", s.mid, [f"train.prompts_per_step={max(1, v // 8)}", "train.candidates_per_prompt=8"],
                      videos_per_step=max(1, v // 8) * 8, queries_per_step=max(1, v // 8) * 8),
        "image": Variant("image", s.mid, [f"selector.key={IMAGE_PROXY}"], trained_on=IMAGE_PROXY,
                         videos_per_step=v, queries_per_step=v),
        "vader": Variant("vader", s.vader, [VADER], videos_per_step=p, queries_per_step=p),
    }
    if grpo:
        out["grpo"] = Variant("grpo", s.mid, GRPO, videos_per_step=p * GRPO_GROUP,
                              queries_per_step=p * GRPO_GROUP)
    return out


# ----------------------------------------------------------------------------------------------- running
def common_overrides(s: Settings, seed: int, out: Path, steps: int) -> list[str]:
    return [REWARDS, f"selector.key={VIDEO_PROXY}", f"seed={seed}", f"train.steps={steps}", f"eval.every={s.every}",
            f"eval.max_prompts={s.eval_prompts}", "eval.seeds_per_prompt=1", "eval.videos=0", "checkpoint.every=0",
            "logging.trackers=[]", f"output_dir={out}", *s.extra]


def offline_pairs(pm, base: list[str], out: Path, seed: int, groups: int) -> Path:
    """Pairs sampled by the base policy with the online run's video budget: ``groups`` prompt draws x N videos,
    drawn as the online run draws its prompts (the same stream of training prompts)."""
    from vpo_core import build_pair_dataset, load_spec, read_prompts
    from vpo_core.data import ordered_indices

    resolved = load_spec(BASE_SPEC, pm, base)
    prompts = read_prompts(resolved.spec.data.prompts, resolved.spec.data.prompts_file)
    drawn = [prompts[i] for i in ordered_indices(len(prompts), seed, 0, groups)]
    out.mkdir(parents=True, exist_ok=True)
    prompt_file = out.parent / f"{out.name}-prompts.txt"
    prompt_file.write_text("\n".join(drawn) + "\n")
    resolved = load_spec(BASE_SPEC, pm, base + [f"data.prompts_file={prompt_file}", "data.prompts=[]"])
    return build_pair_dataset(resolved, out, progress=False)


def run_task(task: tuple[Settings, Variant, int, Path, int]) -> tuple[str, int, list[dict], float]:
    """One (variant, seed) run in a worker process -> per-evaluation mean held-out scores. A finished run of the
    same resolved spec already in the output directory is reused (an interrupted benchmark continues)."""
    s, variant, seed, out_root, threads = task
    import torch

    import vpo_core.report
    from vpo_core import PluginManager, Trainer, load_spec

    torch.set_num_threads(threads)
    vpo_core.report.write_report = lambda output_dir: None  # the per-run HTML report is not needed here
    started = time.time()
    pm = PluginManager()
    out = out_root / f"{variant.name}-seed{seed}"
    overrides = common_overrides(s, seed, out, variant.steps) + variant.overrides
    if variant.offline_pairs_per_step:
        overrides.append(f"data.pairs={out_root / f'pairs-seed{seed}'}")
    resolved = load_spec(BASE_SPEC, pm, overrides)
    if finished(out, resolved):
        return variant.name, seed, heldout_curve(out), 0.0
    shutil.rmtree(out, ignore_errors=True)
    if variant.offline_pairs_per_step:
        pairs = out_root / f"pairs-seed{seed}"
        shutil.rmtree(pairs, ignore_errors=True)
        offline_pairs(pm, common_overrides(s, seed, out, variant.steps), pairs, seed,
                      variant.steps * variant.offline_pairs_per_step)
    Trainer(resolved, progress=False).run()
    return variant.name, seed, heldout_curve(out), time.time() - started


def finished(out: Path, resolved) -> bool:
    try:
        same = json.loads((out / "spec.resolved.json").read_text()) == json.loads(json.dumps(resolved.to_dict()))
        return same and any(json.loads(line).get("final") for line in (out / "eval.jsonl").read_text().splitlines())
    except (OSError, ValueError):
        return False


def heldout_curve(out: Path) -> list[dict]:
    """[{step, key: mean held-out score}] of every evaluation of a run (null scores left out)."""
    curve = []
    for line in (out / "eval.jsonl").read_text().splitlines():
        rec = json.loads(line)
        means = {}
        for key, values in rec["scores"].items():
            values = [v for v in values if v is not None]
            means[key] = sum(values) / len(values) if values else None
        curve.append({"step": rec["step"], **means})
    return curve


# ----------------------------------------------------------------------------------------------- summary
def gain_curve(curves: list[list[dict]], key: str) -> list[tuple[int, float, float]]:
    """(step, mean gain, s.e.) over seeds, gain = score at the step minus the score before training."""
    steps = sorted(set.intersection(*(set(e["step"] for e in c) for c in curves)))
    out = []
    for step in steps:
        at = [next(e[key] for e in c if e["step"] == step) for c in curves]
        out.append((step, *mean_sem([a - c[0][key] for a, c in zip(at, curves) if a is not None
                                     and c[0][key] is not None])))
    return out


def at_step(curve: list[tuple[int, float, float]], step: int) -> tuple[float, float]:
    """The curve's point at ``step`` (or the last evaluation before it)."""
    before = [(m, e) for s, m, e in curve if s <= step]
    return before[-1] if before else (float("nan"), float("nan"))


def fmt(ms: tuple[float, float]) -> str:
    m, e = ms
    if math.isnan(m):
        return "—"
    return f"{m:+.4f} ± {e:.4f}"


def table_rows(vs: dict[str, Variant], results: dict[str, list[list[dict]]], s: Settings) -> list[dict]:
    """One row per (claim, variant, step read)."""
    k = {name: v.overrides[0].split("=")[1] for name, v in vs.items() if name.startswith("k_")}
    queries_at = lambda name, step: vs[name].queries_per_step * step  # noqa: E731
    vader_queries = s.vader * vs["vader"].queries_per_step
    at_vader = lambda name: vader_queries // vs[name].queries_per_step if name in vs else 0  # noqa: E731
    rows = [
        ("C1", "online DPO (OnlineVPO)", "online", s.long),
        ("C1", "offline DPO, base-policy pairs, same #videos", "offline", s.long),
        ("C2", f"curriculum K={k['k_small']}", "k_small", s.mid),
        ("C2", "curriculum K=25 (quickstart)", "online", s.mid),
        ("C2", f"curriculum K={k['k_large']}", "k_large", s.mid),
        ("C2", "fixed reference", "fixed", s.mid),
        ("C3", "N=2 (8 prompts/step)", "n2", s.mid),
        ("C3", "N=4 (4 prompts/step)", "online", s.mid),
        ("C3", "N=8 (2 prompts/step)", "n8", s.mid),
        ("C4", "VADER reward gradient", "vader", s.vader),
        ("C4", "OnlineVPO DPO at VADER's reward queries", "online", at_vader("online")),
        ("C4", "GRPO at VADER's reward queries", "grpo", at_vader("grpo")),
        ("C4", "OnlineVPO DPO, its full run", "online", s.long),
        ("C4", "GRPO, its full run", "grpo", s.mid),
        ("C5", "VADER, long run", "vader", s.vader),
        ("C5", "OnlineVPO, long run", "online", s.long),
        ("C6", "OnlineVPO on the video proxy", "online", s.mid),
        ("C6", "OnlineVPO on the image proxy", "image", s.mid),
    ]
    out = []
    for claim, label, name, step in rows:
        if name not in results:
            continue
        curves = results[name]
        v = vs[name]
        step = max(e["step"] for e in curves[0] if e["step"] <= step)  # the evaluation the row reads
        row = {"claim": claim, "variant": label, "run": name, "step": step, "trained_on": v.trained_on,
               "videos": v.videos_per_step * step, "queries": queries_at(name, step),
               "gain": {key: at_step(gain_curve(curves, key), step) for key in (*GT_KEYS, v.trained_on)}}
        if claim == "C5":  # where the ground truth peaked, and how far it fell from there
            curve = gain_curve(curves, "toy.overall")
            peak = max(curve, key=lambda point: point[1])
            row["peak"] = {"step": peak[0], "gain": peak[1:]}
            row["variant"] += f" (GT peak {peak[1]:+.4f} at step {peak[0]})"
        out.append(row)
    return out


def markdown(rows: list[dict], s: Settings, wall: float, notes: list[str]) -> str:
    lines = [f"Held-out gains (after − before), mean ± s.e. over {s.seeds} seeds; {s.eval_prompts} held-out prompts "
             f"× 1 seed per evaluation. Ground truth = `toyworld` (GT); proxy = the reward the variant trained on.",
             "", "| claim | variant | trained on | steps | sampled videos | reward queries | GT overall | GT color | "
             "GT direction | GT flicker | proxy (trained on) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gain"]
        lines.append(f"| {r['claim']} | {r['variant']} | `{r['trained_on']}` | {r['step']} | {r['videos']} | "
                     f"{r['queries']} | {fmt(g['toy.overall'])} | {fmt(g['toy.color'])} | {fmt(g['toy.direction'])} | "
                     f"{fmt(g['toy.flicker'])} | {fmt(g[r['trained_on']])} |")
    lines += ["", *notes, f"Wall time {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def curves_text(vs: dict[str, Variant], results: dict[str, list[list[dict]]]) -> str:
    lines = ["Curves (step: GT overall gain ± s.e. | proxy gain):", ""]
    for name, curves in results.items():
        gt, proxy = gain_curve(curves, "toy.overall"), gain_curve(curves, vs[name].trained_on)
        points = "; ".join(f"{st}: {fmt(g[1:])} | {p[1]:+.4f}" for st, g, p in
                           ((a[0], a, b) for a, b in zip(gt, proxy)))
        lines.append(f"- {name} (trained on `{vs[name].trained_on}`): {points}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def plot_claims(vs: dict[str, Variant], results: dict[str, list[list[dict]]], plots: Path) -> list[Path]:
    from vpo_core.report import _figure  # the run reports' figure style

    plots.mkdir(parents=True, exist_ok=True)
    written = []

    def band(ax, name: str, key: str, label: str, x_scale: int = 1, style: str = "-", color=None):
        if name not in results:
            return
        pts = gain_curve(results[name], key)
        xs = [p[0] * x_scale for p in pts]
        means, errs = [p[1] for p in pts], [0.0 if math.isnan(p[2]) else p[2] for p in pts]
        line, = ax.plot(xs, means, style, marker="o", ms=3, lw=1.3, label=label, color=color)
        ax.fill_between(xs, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)],
                        alpha=0.2, color=line.get_color())
        ax.axhline(0, color="gray", lw=0.6)

    def figure(name: str, title: str, xlabel: str, ylabel: str, draw) -> None:
        path = plots / name
        _figure(path, title, xlabel, ylabel, draw)
        written.append(path)

    gt = "held-out gain, GT toy.overall"
    figure("C1_online_vs_offline.png", "C1: online vs offline DPO (same sampled videos), trained on the video proxy",
           "sampled videos", gt, lambda ax: [band(ax, n, "toy.overall", lab, vs[n].videos_per_step)
                                             for n, lab in (("online", "online DPO"), ("offline", "offline DPO"))])
    figure("C2_reference_update.png", "C2: curriculum reference update every K steps vs fixed reference",
           "optimizer step", gt,
           lambda ax: [band(ax, n, "toy.overall", lab) for n, lab in (
               ("k_small", f"K={vs['k_small'].overrides[0].split('=')[1]}"), ("online", "K=25"),
               ("k_large", f"K={vs['k_large'].overrides[0].split('=')[1]}"), ("fixed", "fixed"))])
    figure("C3_candidates.png", "C3: N candidates per prompt at an equal number of sampled videos",
           "sampled videos", gt, lambda ax: [band(ax, n, "toy.overall", lab, vs[n].videos_per_step) for n, lab in
                                             (("n2", "N=2"), ("online", "N=4"), ("n8", "N=8"))])
    figure("C4_per_reward_query.png", "C4: ground truth reached per reward query (all trained on the video proxy)",
           "reward queries", gt, lambda ax: [band(ax, n, "toy.overall", lab, vs[n].queries_per_step) for n, lab in
                                             (("vader", "VADER reward gradient"), ("online", "OnlineVPO DPO"),
                                              ("grpo", "GRPO"))])

    def hacking(ax):
        for n, lab, color in (("vader", "VADER", "C3"), ("online", "OnlineVPO", "C0")):
            band(ax, n, "toy.overall", f"{lab}: ground truth", color=color)
            band(ax, n, VIDEO_PROXY, f"{lab}: video proxy (trained on)", style="--", color=color)
    figure("C5_reward_hacking.png", "C5: proxy vs ground truth over a long run (both trained on the video proxy)",
           "optimizer step", "held-out gain (GT / proxy overall)", hacking)

    def feedback(ax):
        for n, lab, color in (("online", "video proxy", "C0"), ("image", "image proxy", "C1")):
            band(ax, n, "toy.direction", f"{lab}: GT direction", color=color)
            band(ax, n, "toy.flicker", f"{lab}: GT flicker", style="--", color=color)
    figure("C6_video_vs_image.png", "C6: OnlineVPO with video vs image feedback: ground-truth motion and flicker",
           "optimizer step", "held-out gain (GT dimension)", feedback)
    return written


# ----------------------------------------------------------------------------------------------- main
def run_all(s: Settings, vs: dict[str, Variant], selected: list[str], args) -> tuple[dict, dict]:
    # Longest runs first so the workers finish together.
    tasks = sorted(((s, vs[name], seed, args.out, args.threads) for name in selected for seed in range(s.seeds)),
                   key=lambda t: -t[1].steps * t[1].videos_per_step)
    results: dict[str, list[list[dict]]] = {name: [None] * s.seeds for name in selected}
    walls: dict[str, list[float]] = {name: [] for name in selected}
    started, failed = time.time(), []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_task, task): task for task in tasks}
        for future in as_completed(futures):
            _, variant, seed, _, _ = futures[future]
            try:
                name, seed, curve, wall = future.result()
            except Exception as exc:  # noqa: BLE001 - the other runs go on; the summary says what is missing
                failed.append(f"{variant.name} seed {seed}: {type(exc).__name__}: {exc}")
                print(f"[{time.time() - started:6.0f}s] FAILED {failed[-1]}", file=sys.stderr, flush=True)
                continue
            results[name][seed] = curve
            walls[name].append(round(wall, 1))
            key = vs[name].trained_on
            print(f"[{time.time() - started:6.0f}s] {name} seed {seed}: GT {curve[-1]['toy.overall']:.4f} "
                  f"(before {curve[0]['toy.overall']:.4f}), {key} {curve[-1][key]:.4f} "
                  f"({f'{wall:.0f}s' if wall else 'reused'})", file=sys.stderr, flush=True)
    if failed:
        raise SystemExit("some runs failed (rerun the same command to continue; finished runs are reused):\n  "
                         + "\n  ".join(failed))
    return results, {"wall_time_s": time.time() - started, "runs": walls}


def grpo_available(pm) -> bool:
    return "grpo" in pm.part_types["objective"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings that check the structure (CI)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default 3; quick 2)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="runs at a time (worker processes; default: one per CPU core)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)),
                        help="torch threads per run (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "claims")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--from-runs", action="store_true", help="summarise the run directories already in --out")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    os.chdir(ROOT)  # the quickstart's paths are relative to the repository root
    s = QUICK if args.quick else FULL
    if args.seeds:
        s.seeds = args.seeds

    from vpo_core import PluginManager, load_spec

    pm = PluginManager()
    base = load_spec(BASE_SPEC, pm, [REWARDS, *s.extra])
    p, n = base.spec.train.prompts_per_step, base.spec.train.candidates_per_prompt
    notes = []
    grpo = grpo_available(pm)
    if not grpo:
        notes.append("GRPO skipped: no installed plugin registers objective `grpo` (`vpo plugins`).")
        print(f"note: {notes[-1]}", file=sys.stderr)
    vs = variants(s, p, n, base.objective.config.reference_update_every, grpo)
    selected = [name for name in vs if not args.only or name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.json"  # wall times, so --from-runs can rebuild the summary from the run directories
    if args.from_runs:
        results = {name: [heldout_curve(args.out / f"{name}-seed{seed}") for seed in range(s.seeds)]
                   for name in selected}
        timing = json.loads(log.read_text()) if log.exists() else {"wall_time_s": float("nan"), "runs": {}}
    else:
        results, timing = run_all(s, vs, selected, args)
        log.write_text(json.dumps(timing, indent=1))
    wall = timing["wall_time_s"]

    rows = table_rows(vs, results, s)
    notes.append(f"Command: `python bench/claims.py{' --quick' if args.quick else ''}"
                 f"` with {args.jobs} run(s) at a time, {args.threads} thread(s) each.")
    text = markdown(rows, s, wall, notes)
    curves = curves_text(vs, results)
    plots = plot_claims(vs, results, args.out / "plots")
    (args.out / "claims.md").write_text(text + "\n" + curves)
    (args.out / "claims.json").write_text(json.dumps(
        {"settings": vars(s), "seeds": s.seeds, "wall_time_s": wall, "rows": rows, "curves": results,
         "run_wall_times_s": timing["runs"], "plots": [str(p) for p in plots]}, indent=1, default=str))
    print("\n" + text + "\n" + curves)
    print(f"wrote {args.out / 'claims.md'}, {args.out / 'claims.json'} and {len(plots)} plots in {args.out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
