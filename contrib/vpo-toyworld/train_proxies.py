"""Train the toy world's learned proxy rewards (a video proxy and an image proxy) on a limited labelled set.

    OMP_NUM_THREADS=1 python contrib/vpo-toyworld/train_proxies.py     # writes vpo_toyworld/weights/proxies/

The labelled set: for every prompt, ground-truth renders, samples of the shipped base model (the policy's own
distribution, at the quickstart's settings and at worse ones) and corrupted clips (wrong shape or background
colour, wrong direction, frozen / shuffled / reversed frames, flickering brightness, pixel noise, tints, blends
with another prompt's clip, blur), so the labels span the range. Labels are the ``toyworld`` ground-truth
scores of each clip for its prompt; the image proxy's labels are the ground-truth ``color`` of each single
frame. Training uses the 148 training prompts only; the agreement printed at the end is measured on the 32
held-out prompts (their combinations of attributes never occur in training).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from diffusers import CogVideoXPipeline

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vpo_toyworld  # noqa: E402
from show_samples import generate  # noqa: E402
from vpo_toyworld import world  # noqa: E402
from vpo_toyworld.proxy import ProxyNet, save_proxy  # noqa: E402
from vpo_toyworld.reward import ToyWorldReward  # noqa: E402

# (inference steps, guidance) of the base-model samples per prompt: the quickstart's policy settings twice, then
# settings that give worse samples (weak guidance, few steps).
SAMPLE_SETTINGS = [(10, 5.0), (10, 5.0), (10, 2.0), (5, 5.0)]
CORRUPTIONS = ("wrong_color", "wrong_background", "wrong_direction", "static", "shuffled", "reversed", "flicker",
               "noise", "tint", "blend", "blur")


def corrupt(clip: torch.Tensor, attributes: world.Attributes, kind: str, rng: random.Random) -> torch.Tensor:
    """A corrupted copy of ``clip`` (a render or a base-model sample) with a random severity."""
    seed = rng.randrange(10**6)
    other = lambda key, values: rng.choice([v for v in values if v != getattr(attributes, key)])  # noqa: E731
    if kind in ("wrong_color", "wrong_background", "wrong_direction"):
        key = kind.removeprefix("wrong_")
        values = {"color": world.SHAPE_COLORS, "background": world.BACKGROUND_COLORS, "direction": world.DIRECTIONS}
        return world.render(world.Attributes(**{**attributes.__dict__, key: other(key, list(values[key]))}), seed)
    t = clip.shape[0]
    g = torch.Generator().manual_seed(seed)
    if kind == "static":
        return clip[rng.randrange(t)].expand_as(clip).clone()
    if kind == "shuffled":
        return clip[torch.randperm(t, generator=g)]
    if kind == "reversed":
        return clip.flip(0)
    if kind == "flicker":  # per-frame brightness
        return (clip + rng.uniform(0.02, 0.2) * torch.randn(t, 1, 1, 1, generator=g)).clamp(0, 1)
    if kind == "noise":
        return (clip + rng.uniform(0.02, 0.15) * torch.randn(clip.shape, generator=g)).clamp(0, 1)
    if kind == "tint":
        return (clip * (1 + rng.uniform(-0.35, 0.35) * (2 * torch.rand(1, 3, 1, 1, generator=g) - 1))).clamp(0, 1)
    if kind == "blend":
        stranger = world.render(rng.choice(world.train_attributes()), seed)
        alpha = rng.uniform(0.3, 0.9)
        return alpha * clip + (1 - alpha) * stranger
    if kind == "blur":
        return torch.nn.functional.avg_pool2d(clip, 3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(kind)


def labelled_set(pipeline, prompts: list[str], renders: int, corrupted: int, seed: int):
    """Clips [N, T, 3, H, W], their prompts, video labels [N, 4] and per-frame colour labels [N, T]."""
    rng = random.Random(seed)
    clips, rows = [], []
    for i, prompt in enumerate(prompts):
        clips += [world.render(prompt, seed * 100_000 + i * 100 + k) for k in range(renders)]
        rows += [prompt] * renders
    samples = []
    for k, (steps, guidance) in enumerate(SAMPLE_SETTINGS):
        part = [generate(pipeline, prompts[j:j + 16], seed * 100_000 + k * 1000 + j, steps, guidance)
                for j in range(0, len(prompts), 16)]
        samples.append(torch.cat(part))
    for k in range(len(SAMPLE_SETTINGS)):
        clips += list(samples[k])
        rows += prompts
    for i, prompt in enumerate(prompts):
        attributes = world.parse_prompt(prompt)
        for _ in range(corrupted):
            start = samples[rng.randrange(len(samples))][i] if rng.random() < 0.5 else \
                world.render(attributes, rng.randrange(10**6))
            clips.append(corrupt(start, attributes, rng.choice(CORRUPTIONS), rng))
            rows.append(prompt)
    clips = torch.stack(clips).float()
    kinds = ["render"] * (renders * len(prompts)) + ["sample"] * (len(SAMPLE_SETTINGS) * len(prompts)) + \
        ["corrupted"] * (corrupted * len(prompts))
    return clips, rows, ground_truth(clips, rows), frame_colors(clips, rows), kinds


def ground_truth(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    scores = ToyWorldReward().score(clips, prompts)
    return torch.stack([scores[d] for d in ("color", "direction", "flicker", "overall")], 1)


def frame_colors(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Ground-truth ``color`` of every frame on its own [N, T] (the image proxy's labels)."""
    n, t = clips.shape[:2]
    singles = clips.flatten(0, 1).unsqueeze(1)
    return ToyWorldReward().score(singles, [p for p in prompts for _ in range(t)])["color"].view(n, t)


def fit(net: ProxyNet, inputs: torch.Tensor, prompts: list[str], labels: torch.Tensor, args, image: bool) -> None:
    """Regression on standardised labels (each dimension counts the same); AdamW with a cosine schedule."""
    net.label_mean.copy_(labels.mean(0))
    net.label_std.copy_(labels.std(0).clamp_min(1e-3))
    scale = net.label_std
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    batch = args.batch * (8 if image else 1)
    total = args.epochs * -(-len(inputs) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    g = torch.Generator().manual_seed(args.seed)
    step, started = 0, time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(inputs), generator=g)
        running = []
        for j in range(0, len(order), batch):
            idx = order[j:j + batch]
            rows = [prompts[i] for i in idx.tolist()]
            if image:
                pred = net.frame_scores(inputs[idx].unsqueeze(1), net.text(rows))  # [batch, 1]
            else:
                pred = net(inputs[idx], rows)
            loss = ((pred - labels[idx]) / scale).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.item())
            step += 1
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"  {net.kind} epoch {epoch + 1}/{args.epochs}: loss {sum(running) / len(running):.4f} "
                  f"({time.time() - started:.0f}s)", flush=True)


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def pair_accuracy(pred: torch.Tensor, truth: torch.Tensor, prompts: list[str], min_gap: float = 0.02) -> float:
    """How often the proxy orders two clips of the same prompt as the ground truth does (gap > min_gap)."""
    right = total = 0
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    for idx in groups.values():
        for a in idx:
            for b in idx:
                if truth[a] - truth[b] > min_gap:
                    total += 1
                    right += int(pred[a] > pred[b])
    return right / total if total else float("nan")  # nan: no pair of clips differs enough


def agreement(pred: torch.Tensor, truth: torch.Tensor, prompts: list[str]) -> str:
    return (f"Pearson {pearson(pred, truth):.3f}  Spearman {pearson(ranks(pred), ranks(truth)):.3f}  "
            f"same-prompt pair accuracy {pair_accuracy(pred, truth, prompts):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "vpo_toyworld" / "weights" / "proxies")
    parser.add_argument("--renders", type=int, default=2, help="ground-truth renders per prompt")
    parser.add_argument("--corrupted", type=int, default=6, help="corrupted clips per prompt")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", type=int, nargs=3, default=[16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    pipeline = CogVideoXPipeline.from_pretrained(vpo_toyworld.default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    train = labelled_set(pipeline, vpo_toyworld.train_prompts(), args.renders, args.corrupted, args.seed + 1)
    heldout = labelled_set(pipeline, vpo_toyworld.heldout_prompts(), args.renders, args.corrupted, args.seed + 2)
    print(f"labelled clips: {len(train[0])} train prompts, {len(heldout[0])} held-out prompts "
          f"({time.time() - started:.0f}s)", flush=True)

    words = world.vocabulary()
    video = ProxyNet("video", args.channels, 32, 64, words)
    fit(video, train[0], train[1], train[2], args, image=False)
    image = ProxyNet("image", args.channels, 32, 64, words)
    t = train[0].shape[1]
    fit(image, train[0].flatten(0, 1), [p for p in train[1] for _ in range(t)], train[3].reshape(-1, 1), args,
        image=True)

    clips, prompts, labels, _, kinds = heldout
    dims = ("color", "direction", "flicker", "overall")
    report = [f"held-out agreement with the toyworld ground truth ({len(clips)} clips of the 32 held-out prompts; "
              f"base-model samples alone: {kinds.count('sample')})"]
    with torch.no_grad():
        v, im = video.eval()(clips, prompts), image.eval()(clips, prompts)[:, 0]
    samples = [i for i, k in enumerate(kinds) if k == "sample"]
    sample_prompts = [prompts[i] for i in samples]
    for name, pred, dim in [*(("video", v[:, i], d) for i, d in enumerate(dims)), ("image", im, "color"),
                            ("image", im, "overall"), ("image", im, "direction"), ("image", im, "flicker")]:
        truth = labels[:, dims.index(dim)]
        report.append(f"  {name} proxy vs ground-truth {dim:9s}: all: {agreement(pred, truth, prompts)}")
        report.append(f"  {'':33s}samples: {agreement(pred[samples], truth[samples], sample_prompts)}")
    print("\n".join(report))
    notes = {"trained_by": "contrib/vpo-toyworld/train_proxies.py", "heldout_agreement": "\n".join(report)}
    save_proxy(video, args.output / "video.safetensors", notes)
    save_proxy(image, args.output / "image.safetensors", notes)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1024:.0f} KiB" for p in sorted(args.output.glob("*.safetensors")))
    print(f"wrote {args.output} ({sizes}); wall time {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
