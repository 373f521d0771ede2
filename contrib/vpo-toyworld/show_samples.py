"""Sample the base model, score the samples with the toyworld reward, and write a GIF and a PNG frame grid.

    python contrib/vpo-toyworld/show_samples.py --gif /tmp/toyworld_samples.gif --png /tmp/toyworld_samples.png

Grid: for each prompt a row of generated frames then a row of the ground-truth render (prompts printed to
stdout in the same order); columns: the 9 frames.
With ``--eval N`` it also reports the mean reward of N samples on train and on held-out prompts, next to the
score of ground-truth renders (the reward's ceiling).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v2 as imageio
import torch
from diffusers import CogVideoXPipeline

import vpo_toyworld
from vpo_toyworld import world
from vpo_toyworld.reward import ToyWorldReward


def generate(pipeline, prompts: list[str], seed: int, steps: int, guidance: float) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    # The toy transformer is built for 16-token prompts; the pipeline's own default pads to 226.
    text_length = pipeline.transformer.config.max_text_seq_length
    return pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=generators, max_sequence_length=text_length).frames  # [B, T, C, H, W] in [0, 1]


def mean_scores(reward, frames, prompts) -> str:
    scores = reward.score(frames, prompts)
    return "  ".join(f"{dim} {value.mean().item():.3f}" for dim, value in scores.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=vpo_toyworld.default_model_path())
    parser.add_argument("--gif", type=Path, default=Path("/tmp/toyworld_samples.gif"))
    parser.add_argument("--png", type=Path, default=Path("/tmp/toyworld_samples.png"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval", type=int, default=0, help="samples per split for the reward report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipeline = CogVideoXPipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    reward = ToyWorldReward()

    train, heldout = vpo_toyworld.train_prompts(), vpo_toyworld.heldout_prompts()
    prompts = (train[::30][: args.samples - args.samples // 3] + heldout[::11])[: args.samples]
    frames = generate(pipeline, prompts, args.seed, args.steps, args.guidance)
    truth = world.render_batch(prompts, list(range(len(prompts))))
    for i, prompt in enumerate(prompts):
        split = "held-out" if prompt in heldout else "train"
        print(f"rows {2 * i}/{2 * i + 1}: sample / ground truth of ({split}) {prompt}")
    # Sample and ground-truth render of the same prompt on consecutive rows; 1-pixel white gaps between tiles.
    pairs = torch.stack([frames, truth], dim=1).flatten(0, 1)  # [2B, T, C, H, W]
    pairs = torch.nn.functional.pad(pairs, (0, 1, 0, 1), value=1.0)
    count, length, _, height, width = pairs.shape
    grid = pairs.permute(0, 3, 1, 4, 2).reshape(count * height, length * width, 3)  # frames left to right
    grid = grid.repeat_interleave(3, 0).repeat_interleave(3, 1)
    imageio.imwrite(args.png, (grid * 255).round().byte().numpy())
    # GIF: columns = prompts, top row = samples, bottom row = ground truth.
    tiles = pairs.view(len(prompts), 2, length, 3, height, width)
    movie = tiles.permute(2, 1, 4, 0, 5, 3).reshape(length, 2 * height, len(prompts) * width, 3)
    movie = movie.repeat_interleave(4, 1).repeat_interleave(4, 2)
    imageio.mimsave(args.gif, list((movie * 255).round().byte().numpy()), duration=0.15, loop=0)
    print(f"wrote {args.png} and {args.gif}")

    if args.eval:
        for name, split in (("train", vpo_toyworld.train_prompts()), ("held-out", vpo_toyworld.heldout_prompts())):
            chosen = [split[(i * 7) % len(split)] for i in range(args.eval)]
            samples = torch.cat([generate(pipeline, chosen[i : i + 16], args.seed + 1000 + i, args.steps,
                                          args.guidance) for i in range(0, len(chosen), 16)])
            print(f"{name:8s} base model : {mean_scores(reward, samples, chosen)}")
            renders = world.render_batch(chosen, list(range(len(chosen))))
            print(f"{name:8s} ground truth: {mean_scores(reward, renders, chosen)}")


if __name__ == "__main__":
    main()
