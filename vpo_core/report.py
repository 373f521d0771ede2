"""``report.html`` with PNG plots from ``metrics.jsonl`` and ``eval.jsonl`` (``vpo report DIR`` redoes it), and
the summary printed at the end of a run. Missing scores (a reward's NaN) are stored as null and left out."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

TOTAL_MEANING = "total = Σ over rewards of weight × mean of that reward's dimensions"
# why a step trained nothing (the loop's Skip values)
SKIP_REASONS = {"no_pairs": "found no pair (every prompt's candidates tied within the selector's min_gap)",
                "no_transitions": "had no transition to train (the objective's expand() chose none)",
                "nonfinite": "had a non-finite reward, loss or gradient",
                "fp16_overflow": "overflowed in fp16 (the loss scaler lowered its scale and skipped the update)"}


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def mean_sem(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    n = len(values)
    if not n:
        return float("nan"), 0.0
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0)


def summarize_eval(output_dir: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{"before"/"after"/"gain": {key: (mean, standard error)}} from the first and the final evaluation; the gain
    pairs the same prompt and seed before and after (its error bar is the honest, smaller one)."""
    evals = _read_jsonl(Path(output_dir) / "eval.jsonl")
    if not evals:
        return {}
    first, last = evals[0]["scores"], ([e for e in evals if e.get("final")] or evals[-1:])[-1]["scores"]
    gain = {k: mean_sem([a - b for a, b in zip(last[k], v) if a is not None and b is not None])
            for k, v in first.items() if k in last and len(last[k]) == len(v)}
    return {"before": {k: mean_sem(v) for k, v in first.items()},
            "after": {k: mean_sem(v) for k, v in last.items()}, "gain": gain}


def total_formula(output_dir: Path) -> str:
    """``total`` spelled out with this run's rewards and weights."""
    try:
        rewards = json.loads((Path(output_dir) / "spec.resolved.json").read_text())["rewards"]
    except (OSError, ValueError, KeyError):
        return TOTAL_MEANING
    return TOTAL_MEANING + "; here total = " + " + ".join(f"{r['weight']:g} × mean({r['name']}.*)" for r in rewards)


def _figure(path: Path, title: str, xlabel: str, ylabel: str, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    draw(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    # The axis labels also travel as PNG text, so a test (or a script) can read what a plot shows.
    fig.savefig(path, dpi=100, metadata={"Title": title, "Description": json.dumps({"x": xlabel, "y": ylabel})})
    plt.close(fig)


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw points are drawn underneath)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def write_report(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    metrics = [m for m in _read_jsonl(output_dir / "metrics.jsonl") if not m.get("final") and m.get("step", 0) > 0]
    sections: list[str] = []

    def per_step(keys: list[str], name: str, title: str, ylabel: str, note: str = "") -> None:
        series = {k: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return
        window = max(1, len(metrics) // 20)

        def draw(ax):
            for k, pts in series.items():
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                dots = ax.plot(xs, ys, ".", ms=2, alpha=0.35)[0]
                ax.plot(xs, _smoothed(ys, window), lw=1.4, color=dots.get_color(), label=f"{k} ({window}-step mean)")
        _figure(plots / name, title, "optimizer step", ylabel, draw)
        sections.append(f"<h2>{html.escape(title)}</h2><img src=\"plots/{name}\" alt=\"{html.escape(title)}\">{note}")

    reward_keys = sorted({k for m in metrics for k in m if k.startswith("reward/")})
    per_step(reward_keys, "reward.png", "Training reward per step (mean over the step's videos)",
             "reward (each reward's own units)", f"<p>{html.escape(total_formula(output_dir))}</p>")
    per_step(["loss"], "loss.png", "Objective loss per step", "loss (objective's units)")
    skipped = [m for m in metrics if m.get("skipped")]
    if skipped:
        why = [f"{n} {text}" for reason, text in SKIP_REASONS.items()
               if (n := sum(m.get("skip_reason") == reason for m in skipped))]
        sections.append(f"<p>{len(skipped)} of {len(metrics)} steps trained nothing: "
                        f"{html.escape('; '.join(why))}.</p>")

    evals = _read_jsonl(output_dir / "eval.jsonl")
    if len(evals) > 1:
        def draw_curve(ax):
            for k in sorted(evals[0]["scores"]):
                pts = [(e["step"], *mean_sem(e["scores"].get(k, []))) for e in evals]
                pts = [p for p in pts if not math.isnan(p[1])]
                if pts:
                    steps, means, errs = zip(*pts)
                    line, = ax.plot(steps, means, marker="o", ms=3, lw=1.2, label=k)
                    ax.fill_between(steps, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)],
                                    color=line.get_color(), alpha=0.2)
        _figure(plots / "eval_curve.png", "Held-out reward per evaluation (mean ± s.e.)", "optimizer step",
                "held-out reward (each reward's own units)", draw_curve)
        sections.append('<h2>Held-out reward per evaluation</h2><img src="plots/eval_curve.png" '
                        'alt="held-out reward per evaluation">')

    summary = summarize_eval(output_dir)
    if summary:
        keys = sorted(summary["before"])

        def draw_gain(ax):
            gains = [summary["gain"].get(k, (float("nan"), 0)) for k in keys]
            ax.errorbar(range(len(keys)), [g[0] for g in gains], yerr=[g[1] for g in gains], fmt="o", capsize=3)
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xticks(range(len(keys)), keys, rotation=20, fontsize=7)
        _figure(plots / "eval_gain.png", "Held-out gain, after − before (paired, mean ± s.e.)", "score key",
                "gain (each reward's own units)", draw_gain)

        def cell(which: str, k: str, signed: bool = False) -> str:
            mean, sem = summary[which].get(k, (float("nan"), 0.0))
            return f"{mean:+.4f} ± {sem:.4f}" if signed else f"{mean:.4f} ± {sem:.4f}"
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{cell('before', k)}</td><td>{cell('after', k)}</td>"
                       f"<td>{cell('gain', k, True)}</td></tr>" for k in keys)
        sections.append('<h2>Held-out reward, before and after</h2><img src="plots/eval_gain.png" alt="gain">'
                        "<table><tr><th>score</th><th>before</th><th>after</th><th>gain (paired: same prompts and "
                        f"seeds)</th></tr>{rows}</table><p>mean ± standard error; "
                        f"{html.escape(total_formula(output_dir))}</p>")

    videos = _side_by_side_videos(output_dir)
    if videos:
        cells = "".join(f"<figure>{_media(v.relative_to(output_dir))}<figcaption>{html.escape(c)}</figcaption></figure>"
                        for v, c in videos)
        sections.append("<h2>Held-out prompts, same seed: before (left) | after (right)</h2>" + cells)

    page = ("<!doctype html><html lang=en><meta charset=utf-8><title>vpo report</title><style>body{font-family:"
            "sans-serif;max-width:900px;margin:auto}img,video{max-width:100%}figure{display:inline-block;margin:6px}"
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
            f"<h1>vpo report: {html.escape(output_dir.name)}</h1>" + "".join(sections) + "</html>")
    path = output_dir / "report.html"
    path.write_text(page)
    return path


def _media(src: Path) -> str:
    url = html.escape(str(src))
    if src.suffix == ".mp4":
        return f'<video src="{url}" controls loop muted autoplay playsinline></video>'
    return f'<img src="{url}" alt="before | after">'


def _side_by_side_videos(output_dir: Path) -> list[tuple[Path, str]]:
    from .video import read_video, side_by_side, write_video

    samples = output_dir / "samples"
    steps = sorted(p for p in samples.glob("step-*") if p.is_dir()) if samples.is_dir() else []
    if len(steps) < 2:
        return []
    evals = _read_jsonl(output_dir / "eval.jsonl")
    prompts = evals[0]["prompts"] if evals else []
    per_prompt = max(1, len(prompts) // max(1, len(set(prompts)))) if prompts else 1
    out = []
    for before in sorted(steps[0].iterdir()):
        after = steps[-1] / before.name
        if not after.exists():
            continue
        try:
            combined = side_by_side(read_video(before), read_video(after))
        except Exception:  # noqa: BLE001 - an unreadable sample should not break the report
            continue
        target = samples / "before_after" / before.name
        write_video(target, combined, fps=8)
        index = int(before.stem.split("-")[-1])
        out.append((target, prompts[index * per_prompt] if index * per_prompt < len(prompts) else before.stem))
    return out


def terminal_summary(result: Any) -> str:
    """What a user reads when a run ends."""
    out, counters = Path(result.output_dir), result.counters
    minutes, seconds = divmod(int(result.wall_time), 60)
    lines = [f"vpo: done: {result.steps_done} steps in {minutes} min {seconds} s"]
    why = [f"{n} {text}" for reason, text in SKIP_REASONS.items() if (n := counters.get(f"skipped_{reason}", 0))]
    if why:
        skipped = sum(counters.get(f"skipped_{reason}", 0) for reason in SKIP_REASONS)
        lines.append(f"  {skipped} of {result.steps_done} steps trained nothing: {'; '.join(why)}")
    summary = summarize_eval(out)
    if summary:
        lines.append("  held-out reward, before -> after, paired gain ± s.e.:")
        width = max(len(k) for k in summary["before"])
        for k in sorted(summary["before"]):
            (b, _), (a, _), (g, e) = summary["before"][k], summary["after"].get(k, (math.nan, 0)), \
                summary["gain"].get(k, (math.nan, 0))
            lines.append(f"    {k:<{width}}  {b:.4f} -> {a:.4f}   {g:+.4f} ± {e:.4f}")
        lines.append(f"  ({TOTAL_MEANING})")
    lines.append(f"  report: {out / 'report.html'}")
    lines.append(f"  tuned weights: {out / 'final'}")
    return "\n".join(lines)
