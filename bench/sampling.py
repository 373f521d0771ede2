"""Candidates per second: the cogvideox policy's batched sampling vs sequential stock CogVideoXPipeline calls.

Both make the same videos (same tiny random CogVideoX, seeds, steps, guidance; the script checks that the
first candidate matches). The policy makes N candidates for each of P prompts in one ``sample`` call with
``micro_batch_size=N``; stock diffusers makes them with N * P calls (``num_videos_per_prompt=1``, one seed
each), as a user of the pipeline would for per-candidate reproducibility.

    python bench/sampling.py                 # defaults: < 1 min on a CPU
    python bench/sampling.py --frames 17 --height 64 --width 64 --steps 20 --candidates 8
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2, help="P distinct prompts")
    parser.add_argument("--candidates", type=int, default=4, help="N candidates per prompt")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--variant", choices=["2b", "5b"], default="2b", help="tiny model like CogVideoX-2b or -5b")
    parser.add_argument("--no-text-cache", action="store_true", help="re-encode prompts every call, as stock does")
    parser.add_argument("--vae-slicing", action="store_true", help="decode one video at a time (memory option)")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (more make timings erratic on a shared CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def _timed(run) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time of each run; repetitions interleave the runs so a busy machine slows both alike."""
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_timed(run))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    from diffusers import CogVideoXPipeline
    from vpo_core import BuildContext
    from vpo_cogvideox import CogVideoXConfig, build, build_tiny_cogvideox

    args = parse_args()
    torch.set_num_threads(args.threads)
    words = ["a cat running on the beach", "a red car in the city at night", "a bird flying in the sky"]
    prompts = [words[p % len(words)] for p in range(args.prompts) for _ in range(args.candidates)]
    seeds = list(range(len(prompts)))
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_cogvideox(f"{tmp}/tiny", variant=args.variant)
        config = CogVideoXConfig(
            model=str(model),
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            micro_batch_size=args.candidates,
            text_cache_size=0 if args.no_text_cache else 1024,
            vae_slicing=args.vae_slicing,
        )
        policy = build(config, BuildContext(device=device, seed=0))
        pipe = CogVideoXPipeline.from_pretrained(model).to(device)
        pipe.set_progress_bar_config(disable=True)

    def stock(rows=range(len(prompts))):
        return [
            pipe(
                prompts[i],
                num_videos_per_prompt=1,
                num_frames=args.frames,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(seeds[i]),
                output_type="pt",
            ).frames
            for i in rows
        ]

    def batched():
        return policy.sample(prompts, seeds).frames

    difference = (batched()[:1] - stock(rows=[0])[0].to(device)).abs().max().item()
    times = best_times({"policy": batched, "stock": stock}, args.repeats)
    policy_time, stock_time = times["policy"], times["stock"]
    n = len(prompts)
    print(
        f"{args.prompts} prompts x {args.candidates} candidates, {args.frames}x{args.height}x{args.width}, "
        f"{args.steps} steps, CFG {args.guidance}, tiny CogVideoX-{args.variant} on {device}, "
        f"{torch.get_num_threads()} threads, vae_slicing={args.vae_slicing}, best of {args.repeats}"
    )
    print(f"max |policy - stock| on candidate 0: {difference:.2e}")
    print(f"vpo policy, one call (micro_batch_size={args.candidates}): {n / policy_time:8.2f} candidates/s")
    print(f"stock CogVideoXPipeline, {n} sequential calls: {n / stock_time:8.2f} candidates/s")
    print(f"ratio policy/stock: {stock_time / policy_time:.2f}")


if __name__ == "__main__":
    main()
