"""Candidates per second: a diffusers policy's batched ``sample`` vs the stock diffusers pipeline, called two ways.

* **stock, batched**: one pipeline call with every row's prompt and a list of generators (one per row) - how a
  competent user makes N reproducible candidates per prompt with diffusers. This is the fair baseline.
* **stock, sequential**: one call per candidate (``num_videos_per_prompt=1``, one generator each).

The policy makes the same videos (same tiny random model, seeds, steps, guidance; the script prints the largest
difference to each baseline) in one ``sample`` call with ``micro_batch_size`` = all rows, once with VAE slicing off
and once on. ``--model cogvideox`` (tiny CogVideoX-2b/-5b) or ``--model wan`` (tiny Wan 2.1 / 2.2 A14B / TI2V-5B).

    python bench/sampling.py                                  # tiny CogVideoX-2b, < 1 min on a CPU
    python bench/sampling.py --model wan --variant 2.2-a14b
    python bench/sampling.py --frames 17 --height 64 --width 64 --steps 20

``--vae-memory``: instead, the peak memory of decoding ``--rows`` videos with and without slicing, with the
published VAE architectures (random weights, default configs: CogVideoX-2b's ``AutoencoderKLCogVideoX`` and Wan 2.1's
``AutoencoderKLWan``) at ``--frames`` x ``--height`` x ``--width``; each measurement runs in a fresh process (peak RSS
on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = {"cogvideox": ("2b", "5b"), "wan": ("2.1", "2.2-a14b", "2.2-ti2v")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(VARIANTS), default="cogvideox")
    parser.add_argument("--variant", help="cogvideox: 2b (default), 5b; wan: 2.1 (default), 2.2-a14b, 2.2-ti2v")
    parser.add_argument("--prompts", type=int, default=2, help="P distinct prompts")
    parser.add_argument("--candidates", type=int, default=4, help="N candidates per prompt")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=None, help="default: the tiny model's (32; 64 for TI2V)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (more make timings erratic when shared)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vae-memory", action="store_true", help="measure VAE decode memory instead (see above)")
    parser.add_argument("--rows", type=int, default=4, help="--vae-memory: videos decoded together")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variant = args.variant or VARIANTS[args.model][0]
    if args.variant not in VARIANTS[args.model]:
        parser.error(f"--variant {args.variant} is not one of {VARIANTS[args.model]} for --model {args.model}")
    return args


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_times(runs: dict, repeats: int) -> dict:
    """Best wall time of each run; repetitions interleave the runs so a busy machine slows them alike."""
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            _synchronize()
            start = time.perf_counter()
            run()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def build_models(args, directory: str):
    """The tiny pipeline on disk, the policy (slicing off / on) and the stock pipeline."""
    from vpo_core import BuildContext

    context = BuildContext(device=torch.device(args.device), seed=0)
    common = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, micro_batch_size=args.prompts * args.candidates)
    if args.model == "cogvideox":
        from diffusers import CogVideoXPipeline
        from vpo_cogvideox import CogVideoXConfig, build, build_tiny_cogvideox

        model = str(build_tiny_cogvideox(f"{directory}/tiny", variant=args.variant))
        policies = {s: build(CogVideoXConfig(model=model, vae_slicing=s, **common), context) for s in (False, True)}
        pipe = CogVideoXPipeline.from_pretrained(model)
    else:
        from diffusers import WanPipeline
        from vpo_wan import WanConfig, build, build_tiny_wan

        model = str(build_tiny_wan(f"{directory}/tiny", variant=args.variant))
        policies = {s: build(WanConfig(model=model, vae_slicing=s, **common), context) for s in (False, True)}
        pipe = WanPipeline.from_pretrained(model)
    pipe.to(args.device).set_progress_bar_config(disable=True)
    return policies, pipe


def speed(args) -> None:
    if args.height is None:
        args.height = args.width = 64 if args.variant == "2.2-ti2v" else 32
    words = ["a cat running on the beach", "a red car in the city at night", "a bird flying in the sky"]
    prompts = [words[p % len(words)] for p in range(args.prompts) for _ in range(args.candidates)]
    seeds = list(range(len(prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        policies, pipe = build_models(args, tmp)
    settings = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="pt")

    def stock_batched():
        return pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **settings).frames

    def stock_sequential():
        return torch.cat([pipe(p, generator=torch.Generator().manual_seed(s), **settings).frames
                          for p, s in zip(prompts, seeds)])

    runs = {"policy": lambda: policies[False].sample(prompts, seeds).frames,
            "policy_sliced": lambda: policies[True].sample(prompts, seeds).frames,
            "stock_batched": stock_batched, "stock_sequential": stock_sequential}
    mine = runs["policy"]()
    to_batched = (mine - stock_batched().to(mine.device)).abs().max().item()
    to_sequential = (mine - stock_sequential().to(mine.device)).abs().max().item()
    times = best_times(runs, args.repeats)
    n = len(prompts)
    print(f"{args.prompts} prompts x {args.candidates} candidates, {args.frames}x{args.height}x{args.width}, "
          f"{args.steps} steps, CFG {args.guidance}, tiny {args.model} {args.variant} on {args.device}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"max |policy - stock|, all {n} rows: batched call {to_batched:.2e}, sequential calls {to_sequential:.2e}")
    labels = {"policy": f"vpo policy, one call, vae_slicing off (the CPU default)",
              "policy_sliced": "vpo policy, one call, vae_slicing on",
              "stock_batched": "stock pipeline, one batched call with a list of generators",
              "stock_sequential": f"stock pipeline, {n} sequential calls"}
    for name, label in labels.items():
        print(f"{label:<62} {n / times[name]:8.2f} candidates/s")
    for name in ("policy", "policy_sliced"):
        print(f"ratio {name}/stock: vs batched {times['stock_batched'] / times[name]:.2f}, "
              f"vs sequential {times['stock_sequential'] / times[name]:.2f}")


# ----------------------------------------------------------------------------------------------- VAE memory
def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def vae_memory_child(args) -> None:
    """One measurement: peak memory of a decode of ``rows`` videos (sliced or not) above the set-up."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    rows, sliced = json.loads(args.child)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = (AutoencoderKLCogVideoX() if args.model == "cogvideox" else AutoencoderKLWan()).to(device).eval()
    frames = (args.frames - 1) // 4 + 1
    channels = vae.config.latent_channels if args.model == "cogvideox" else vae.config.z_dim
    latents = torch.randn(rows, channels, frames, args.height // 8, args.width // 8, device=device)
    base = _peak_bytes(device)
    start = time.perf_counter()
    with torch.no_grad():
        videos = [vae.decode(z).sample for z in latents.split(1)] if sliced else [vae.decode(latents).sample]
    _synchronize()
    print(json.dumps({"peak_mib": (_peak_bytes(device) - base) / 2**20, "seconds": time.perf_counter() - start,
                      "frames": videos[0].shape[2]}))


def vae_memory(args) -> None:
    args.height, args.width = args.height or 96, args.width or 160
    print(f"{args.model} VAE (published architecture, random weights), decode of latents for {args.frames}x"
          f"{args.height}x{args.width} on {args.device}, float32, peak above set-up:")
    for rows, sliced in ((1, False), (args.rows, True), (args.rows, False)):
        command = [sys.executable, __file__, "--model", args.model, "--frames", str(args.frames), "--height",
                   str(args.height), "--width", str(args.width), "--device", args.device, "--threads",
                   str(args.threads), "--vae-memory", "--child", json.dumps([rows, sliced])]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        label = f"{rows} video(s), {'sliced (one at a time)' if sliced else 'at once'}"
        print(f"  {label:<32} {result['peak_mib']:8.1f} MiB   {result['seconds']:6.1f} s")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        vae_memory_child(args)
    elif args.vae_memory:
        vae_memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
