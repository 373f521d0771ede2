"""Peak memory of one OnlineVPO training step vs one VADER step on the same CogVideoX or Open-Sora configuration.

Measured, each in a fresh child process (so one measurement cannot reuse another's memory):

* OnlineVPO step: sample N candidates for P prompts under ``no_grad`` (CFG, decoded), score them, select
  best vs worst (``best_worst``), Diffusion-DPO loss (``dpo``: policy forward with grad + reference forward)
  and backward -- at two video sizes, and at 10 vs 50 sampling steps.
* VADER step: one rollout with a gradient window (``reward_gradient``, last-step cutoff), decode with grad,
  score, backward -- at the same two sizes.

Both use the real ``cogvideox`` (or, with ``--policy opensora``, ``opensora``) policy, ``best_worst`` / ``dpo`` /
``reward_gradient`` parts, called in the order ``vpo_core.loop`` calls them, on a random model in the published
layout that is larger than the test model (wider / deeper transformer, wider VAE) so that activations dominate
the weights. The
reward is the core's pure-torch ``toy_brightness`` (a real reward model's own memory is left out: it adds the
same frozen weights to both, and VADER additionally its activations for backward).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation after set-up. On CPU, peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` after set-up) minus RSS after set-up, with glibc told
to serve every allocation >= 64 KiB by mmap so that freed tensors leave the RSS at once.

    OMP_NUM_THREADS=2 python bench/memory.py                  # CPU: ~9 min on 2 shared cores
    python bench/memory.py --device cuda --sizes 49x480x720 --layers 30 --heads 30 --head-dim 64
    python bench/memory.py --vader-frames one_random          # VADER decoding one latent frame (image rewards)
    OMP_NUM_THREADS=2 python bench/memory.py --policy opensora   # Open-Sora v1.2 (random STDiT3 + video VAE)
    OMP_NUM_THREADS=2 python bench/memory.py --policy videocrafter2   # VideoCrafter2 (random LVDM UNet, CFG 12)

Measured on 2 shared CPU cores (defaults; MiB above set-up): OnlineVPO 78.9 / 161.4 vs VADER (frames=all)
205.9 / 737.6 at 9x64x64 / 17x96x96 (ratios 0.38 / 0.22); OnlineVPO at 50 vs 10 steps: 1.001x. With
``--vader-frames one_random`` VADER needs 82.4 / 147.8 (ratios 0.96 / 1.09): then OnlineVPO's peak is its
sampling batch (N candidates x 2 for CFG; lower the policy's micro_batch_size to cut it). ``--policy videocrafter2``
(16 frames, CFG 12): OnlineVPO 222.1 / 686.9 vs VADER 322.2 / 1066.7 at 16x64x64 / 16x128x128 (ratios 0.69 /
0.64; 50 vs 10 steps 1.013x); with ``--vader-frames one_random`` VADER needs 160.3 / 387.0 (ratios 1.39 / 1.77).

The CUDA line above approximates CogVideoX-2B's transformer (30 layers, 30 heads x 64) with a random model;
point ``--model THUDM/CogVideoX-2b`` at the real weights to measure those instead. For Open-Sora, ``--model DIR``
takes a directory with ``transformer/``, ``vae/`` and ``text_encoder/`` in the published layouts, and
``--model published`` the hub ids (STDiT-v3 is 28 layers, 16 heads x 72: ``--layers 28 --heads 16 --head-dim 72``
for a random stand-in). For VideoCrafter2 the random model is an LVDM UNet with 64 channels, multipliers (1, 2, 2),
heads of 32, and a 4-level SD VAE (32-64 channels, x8 as VideoCrafter2's); ``--model DIR`` takes a directory with
``model.ckpt`` (or the converted ``model.safetensors``) and ``tokenizer/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROMPT = "a dog running on the beach"


# ----------------------------------------------------------------------------------------------- model
def build_model(directory: Path, layers: int, heads: int, head_dim: int, vae_channels: int) -> Path:
    """A random CogVideoX pipeline in diffusers layout: the tiny test pipeline with a larger transformer and VAE."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from vpo_cogvideox import build_tiny_cogvideox

    build_tiny_cogvideox(directory, seed=0)  # tokenizer, T5 (d_model 32), scheduler; transformer/vae replaced
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        time_embed_dim=64, text_embed_dim=32, num_layers=layers, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
    ).save_pretrained(directory / "transformer")
    c = vae_channels
    AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(c, c, c), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=32, sample_width=32,
    ).save_pretrained(directory / "vae")
    return directory


def build_opensora_model(directory: Path, layers: int, heads: int, head_dim: int, vae_channels: int) -> Path:
    """A random Open-Sora v1.2 in the published layouts: the tiny test model with a larger STDiT3 and video VAE."""
    from diffusers import AutoencoderKL
    from vpo_opensora import build_tiny_opensora
    from vpo_opensora.stdit3 import STDiT3, STDiT3Config
    from vpo_opensora.vae import OpenSoraVAE, TemporalVAE

    build_tiny_opensora(directory, seed=0)  # T5 (d_model 32) and tokenizer; transformer/vae replaced
    torch.manual_seed(0)
    STDiT3(STDiT3Config(hidden_size=heads * head_dim, depth=layers, num_heads=heads, caption_channels=32)
           ).save_pretrained(directory / "transformer")
    c = vae_channels
    spatial = AutoencoderKL(latent_channels=4, layers_per_block=1, norm_num_groups=4, block_out_channels=(c,) * 4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    temporal = TemporalVAE(filters=c // 2, num_res_blocks=1, temporal_downsample=(False, True, True), num_groups=4)
    OpenSoraVAE(spatial, temporal, shift=(-0.10, 0.34, 0.27, 0.98), scale=(3.85, 2.32, 2.33, 3.06)
                ).save_pretrained(directory / "vae")
    return directory


def build_videocrafter2_model(directory: Path, *unused) -> Path:
    """A random VideoCrafter2 model.ckpt (original key names): the tiny test model with a larger UNet."""
    from vpo_videocrafter2.testing import build_tiny_videocrafter2
    from vpo_videocrafter2.unet import UNetConfig

    unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4, 2, 1),
                      num_head_channels=32, context_dim=64)
    return build_tiny_videocrafter2(directory, seed=0, unet=unet, vae_mult=(1, 2, 2, 2))  # VAE x8 as VideoCrafter2's


def build_policy(args: argparse.Namespace, device: torch.device, frames: int, height: int, width: int):
    from vpo_core import BuildContext

    common = dict(num_frames=frames, height=height, width=width, num_inference_steps=args.steps,
                  micro_batch_size=args.candidates, gradient_checkpointing=True,
                  dtype="bfloat16" if device.type == "cuda" else "float32")
    if args.policy == "cogvideox":
        from vpo_cogvideox import CogVideoXConfig, build

        config = CogVideoXConfig(model=args.model, guidance_scale=6.0, **common)
    elif args.policy == "videocrafter2":
        from vpo_videocrafter2 import VideoCrafter2Config, build

        tokenizer = Path(args.model) / "tokenizer"
        config = VideoCrafter2Config(model=args.model, guidance_scale=12.0, **common, **(
            {"tokenizer": str(tokenizer)} if tokenizer.is_dir() else {}))
    else:
        from vpo_opensora import OpenSoraConfig, build

        parts = {} if args.model == "published" else {
            "model": f"{args.model}/transformer", "vae": f"{args.model}/vae",
            "text_encoder": f"{args.model}/text_encoder"}
        config = OpenSoraConfig(guidance_scale=7.0, **parts, **common)
    return build(config, BuildContext(device=device, seed=0))


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the level at ``start()``, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (self._status("VmHWM") - self.base) / 2**20


# ----------------------------------------------------------------------------------------------- one step
def child(args: argparse.Namespace) -> None:
    import vpo_core.testing as toy
    from vpo_core import PromptBatch, StepContext
    from vpo_core.data import pairs_to_batch
    from vpo_onlinevpo import BestWorstConfig, BestWorstSelector, DPOConfig, DPOObjective
    from vpo_vader import RewardGradientConfig, RewardGradientObjective

    device = torch.device(args.device)
    frames, height, width = (int(v) for v in args.size.split("x"))
    policy = build_policy(args, device, frames, height, width)
    reward = toy.ToyReward(toy.ToyRewardConfig(), None)

    def score(video, prompts):  # the loop's Trainer.score with one reward of weight 1
        dims = reward.score(video, prompts)
        out = {f"toy.{k}": v for k, v in dims.items()}
        out["total"] = torch.stack(list(dims.values())).mean(0)
        return out

    # set-up: text embeddings cached, as after the first step (CogVideoX's CFG encodes the empty negative prompt)
    policy.embed_prompts([PROMPT, ""] if args.policy in ("cogvideox", "videocrafter2") else [PROMPT])
    ctx = StepContext(step=1, generator=torch.Generator().manual_seed(0), score=score)
    memory = PeakMemory(device)
    memory.start()
    if args.case == "onlinevpo":
        rows = [PROMPT] * args.candidates
        policy.train(False)
        with torch.no_grad():
            rollout = policy.sample(rows, list(range(len(rows))), decode=True)
            scores = score(rollout.frames, rows)
        policy.train(True)
        grid = {k: v.reshape(1, args.candidates) for k, v in scores.items()}
        pairs = BestWorstSelector(BestWorstConfig(key="toy.brightness")).select(grid)
        batch = pairs_to_batch(pairs, rollout.latents, [PROMPT], args.candidates)
        del rollout
        out = DPOObjective(DPOConfig()).loss(policy, batch, ctx)
    else:
        objective = RewardGradientObjective(RewardGradientConfig(
            cutoff="last", frames=args.vader_frames, rewards={"toy.brightness": {}}))
        out = objective.loss(policy, PromptBatch([PROMPT], [0]), ctx)
    out.loss.backward()
    grads = sum(int(p.grad is not None) for p in policy.trainable_parameters())
    print(json.dumps({"peak_mib": memory.peak(), "trainable_with_grad": grads}))


# ----------------------------------------------------------------------------------------------- driver
def measure(args: argparse.Namespace, case: str, size: str, steps: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS at once
    command = [sys.executable, __file__, "--child", case, "--policy", args.policy, "--size", size,
               "--steps", str(steps),
               "--model", args.model, "--device", args.device, "--candidates", str(args.candidates),
               "--vader-frames", args.vader_frames]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"measurement {case} {size} {steps} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["trainable_with_grad"] > 0, "the step did not reach the trainable parameters"
    return record["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="cogvideox", choices=["cogvideox", "opensora", "videocrafter2"])
    parser.add_argument("--sizes", default=None, help="FRAMESxHEIGHTxWIDTH, comma separated (default: 9x64x64,"
                        "17x96x96 for CogVideoX; 17x64x64,34x96x96 for Open-Sora, which takes 1 or >= 17 frames; "
                        "16x64x64,16x128x128 for VideoCrafter2)")
    parser.add_argument("--steps", default="10,50", help="sampling steps: the first is used for the size table")
    parser.add_argument("--candidates", type=int, default=4, help="N candidates per prompt (OnlineVPO)")
    parser.add_argument("--vader-frames", default="all", choices=["all", "every_nth", "one_random"])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--vae-channels", type=int, default=32)
    parser.add_argument("--model", default=None, help="instead of a random model: a CogVideoX hub id / directory; "
                        "for Open-Sora a directory with transformer/, vae/, text_encoder/, or 'published'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=["onlinevpo", "vader"], dest="case", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        args.steps = int(args.steps)
        return child(args)

    default_sizes = {"cogvideox": "9x64x64,17x96x96", "opensora": "17x64x64,34x96x96",
                     "videocrafter2": "16x64x64,16x128x128"}
    sizes = (args.sizes or default_sizes[args.policy]).split(",")
    steps = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            builder = {"cogvideox": build_model, "opensora": build_opensora_model,
                       "videocrafter2": build_videocrafter2_model}[args.policy]
            args.model = str(builder(Path(tmp) / args.policy, args.layers, args.heads, args.head_dim,
                                     args.vae_channels))
            name = {"cogvideox": "CogVideoX", "opensora": "Open-Sora v1.2",
                    "videocrafter2": "VideoCrafter2"}[args.policy]
            what = (f"random {name} ({args.layers} layers, {args.heads}x{args.head_dim} heads, "
                    f"VAE {args.vae_channels} ch)" if args.policy != "videocrafter2" else
                    f"random {name} (LVDM UNet 64 ch x (1, 2, 2), heads of 32; SD VAE 32-64 ch, x8)")
        else:
            what = args.model
        cfg = {"cogvideox": 6, "opensora": 7, "videocrafter2": 12}[args.policy]
        print(f"{what} on {args.device}; OnlineVPO: 1 prompt x {args.candidates} candidates, CFG {cfg}, DPO on the "
              f"best/worst pair; VADER: 1 rollout, last-step cutoff, frames={args.vader_frames}; "
              f"gradient checkpointing on")
        print(f"{'size':>12} {'steps':>5} {'OnlineVPO MiB':>14} {'VADER MiB':>10} {'OnlineVPO/VADER':>16}")
        first = {}
        for size in sizes:
            online = measure(args, "onlinevpo", size, steps[0])
            vader = measure(args, "vader", size, steps[0])
            first[size] = online
            print(f"{size:>12} {steps[0]:>5} {online:>14.1f} {vader:>10.1f} {online / vader:>16.2f}")
        for size in sizes[:1]:
            for n in steps[1:]:
                online = measure(args, "onlinevpo", size, n)
                print(f"{size:>12} {n:>5} {online:>14.1f} {'':>10} {'':>16}  "
                      f"OnlineVPO {n} vs {steps[0]} steps: {online / first[size]:.3f}x")


if __name__ == "__main__":
    main()
