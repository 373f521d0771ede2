"""``report.html`` with PNG plots, built from ``metrics.jsonl`` and ``eval.jsonl`` (``vpo report DIR`` redoes it)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .video import read_video, side_by_side, write_video  # noqa: E402


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _mean_sem(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize_eval(output_dir: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{"before"/"after": {key: (mean, standard error)}} from the first and the final evaluation."""
    evals = _read_jsonl(Path(output_dir) / "eval.jsonl")
    if not evals:
        return {}
    out = {"before": {k: _mean_sem(v) for k, v in evals[0]["scores"].items()}}
    finals = [e for e in evals if e.get("final")] or evals[-1:]
    out["after"] = {k: _mean_sem(v) for k, v in finals[-1]["scores"].items()}
    # Same prompts and seeds before and after: the paired difference has the honest (smaller) error bar.
    out["gain"] = {k: _mean_sem([a - b for a, b in zip(finals[-1]["scores"][k], before)])
                   for k, before in evals[0]["scores"].items()
                   if k in finals[-1]["scores"] and len(finals[-1]["scores"][k]) == len(before)}
    return out


def write_report(output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    metrics = [m for m in _read_jsonl(output_dir / "metrics.jsonl") if not m.get("final")]
    sections: list[str] = []

    reward_keys = sorted({k for m in metrics for k in m if k.startswith("reward/")})
    for title, keys, name in (("Training reward (mean over sampled videos)", reward_keys, "reward.png"),
                              ("Loss", ["loss"], "loss.png")):
        series = {k: [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)
        sections.append(f'<h2>{html.escape(title)}</h2><img src="plots/{name}">')

    evals = _read_jsonl(output_dir / "eval.jsonl")
    if len(evals) > 1:
        # Held-out reward at every evaluation: the curve that says whether training helped and when.
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for k in sorted(evals[0]["scores"]):
            pts = [(e["step"], *_mean_sem(e["scores"][k])) for e in evals if e["scores"].get(k)]
            if not pts:
                continue
            steps, means, errs = zip(*pts)
            line, = ax.plot(steps, means, marker="o", ms=3, lw=1.2, label=k)
            ax.fill_between(steps, [m - e for m, e in zip(means, errs)], [m + e for m, e in zip(means, errs)],
                            color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title("Held-out reward per evaluation (mean ± s.e.)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "eval_curve.png", dpi=100)
        plt.close(fig)
        sections.append('<h2>Held-out reward per evaluation</h2><img src="plots/eval_curve.png">')

    summary = summarize_eval(output_dir)
    if summary:
        keys = sorted(summary["before"])
        # Points, not bars, so the axis zooms to the scores; the paired gain gets its own panel because its
        # error bar (same prompts and seeds) is much smaller than the spread of either mean.
        fig, (ax, gain_ax) = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(keys)), 3.4))
        x = range(len(keys))
        for offset, which in ((-0.12, "before"), (0.12, "after")):
            means = [summary[which].get(k, (float("nan"), 0))[0] for k in keys]
            errs = [summary[which].get(k, (0, 0))[1] for k in keys]
            ax.errorbar([i + offset for i in x], means, yerr=errs, fmt="o", capsize=3, label=which)
        ax.set_xticks(list(x), keys, rotation=20, fontsize=7)
        ax.set_title("Held-out reward (mean ± s.e.)", fontsize=9)
        ax.legend(fontsize=7)
        gains = [summary["gain"].get(k, (float("nan"), 0)) for k in keys]
        gain_ax.errorbar(list(x), [g[0] for g in gains], yerr=[g[1] for g in gains], fmt="o", capsize=3,
                         color="tab:green")
        gain_ax.axhline(0.0, color="gray", lw=0.8)
        gain_ax.set_xticks(list(x), keys, rotation=20, fontsize=7)
        gain_ax.set_title("After − before, paired (mean ± s.e.)", fontsize=9)
        fig.tight_layout()
        fig.savefig(plots / "eval_before_after.png", dpi=100)
        plt.close(fig)
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{summary['before'][k][0]:.4f} ± {summary['before'][k][1]:.4f}</td>"
            f"<td>{summary['after'].get(k, (float('nan'), 0))[0]:.4f} ± {summary['after'].get(k, (0, 0))[1]:.4f}"
            f"</td><td>{summary['gain'].get(k, (float('nan'), 0))[0]:+.4f} ± {summary['gain'].get(k, (0, 0))[1]:.4f}"
            f"</td></tr>" for k in keys)
        sections.append('<h2>Held-out reward</h2><img src="plots/eval_before_after.png">'
                        "<table><tr><th>score</th><th>before</th><th>after</th><th>gain (paired: same prompts and "
                        f"seeds)</th></tr>{rows}</table><p>mean ± standard error</p>")

    videos = _side_by_side_videos(output_dir)
    if videos:
        cells = "".join(f'<figure><img src="{v.relative_to(output_dir)}"><figcaption>{html.escape(c)}'
                        f"</figcaption></figure>" for v, c in videos)
        sections.append(f"<h2>Held-out prompts: before | after</h2>{cells}")

    page = ("<!doctype html><meta charset=utf-8><title>vpo report</title><style>body{font-family:sans-serif;"
            "max-width:900px;margin:auto}img{max-width:100%}figure{display:inline-block;margin:6px}"
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style>"
            f"<h1>vpo report: {html.escape(output_dir.name)}</h1>" + "".join(sections))
    path = output_dir / "report.html"
    path.write_text(page)
    return path


def _side_by_side_videos(output_dir: Path) -> list[tuple[Path, str]]:
    samples = output_dir / "samples"
    steps = sorted(p for p in samples.glob("step-*") if p.is_dir()) if samples.is_dir() else []
    if len(steps) < 2:
        return []
    first, last = steps[0], steps[-1]
    evals = _read_jsonl(output_dir / "eval.jsonl")
    prompts = evals[0]["prompts"] if evals else []
    seeds_per_prompt = max(1, len(prompts) // max(1, len(set(prompts)))) if prompts else 1
    out = []
    for before in sorted(first.iterdir()):
        after = last / before.name
        if not after.exists():
            continue
        try:
            combined = side_by_side(read_video(before), read_video(after))
        except Exception:  # noqa: BLE001 - an unreadable sample should not break the report
            continue
        target = output_dir / "samples" / "before_after" / before.name
        write_video(target, combined, fps=8)
        index = int(before.stem.split("-")[-1])
        caption = prompts[index * seeds_per_prompt] if index * seeds_per_prompt < len(prompts) else before.stem
        out.append((target, caption))
    return out
