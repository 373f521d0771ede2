"""Tiny pure-torch parts for testing the core and for trying vpo without any model (``VPO_EXTRA_PLUGINS=vpo_core.testing``).

* policy ``toy``: a per-pixel eps-prediction denoiser over "latents" ``[B,T,3,H,W]``; frames = sigmoid(latents);
  DDIM sampling; full fine-tuning through ``TrainableModule`` (the reference is its frozen copy).
* reward ``toy_brightness``: dims ``brightness`` (mean pixel) and ``smoothness`` (1 - mean |frame difference|).
* selector ``toy_best_worst`` and objectives ``toy_dpo`` (Diffusion-DPO from the core) and
  ``toy_reward_gradient`` (maximise the total reward through the last denoising steps).
The first-party plugins provide the real versions of these (vpo-onlinevpo, vpo-vader).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import TrainableModule
from .dpo import dpo_pair_loss
from .hookspecs import hookimpl
from .sampling import ddim_step, gaussian_log_prob, randn_rows, row_generators, stochastic_step
from .types import (BuildContext, GradientWindow, Objective, ObjectiveConfig, ObjectiveOutput, Pair, PairBatch,
                    PolicyConfig, PromptBatch, RewardConfig, Rollout, SelectorConfig, StepContext, TrainablePolicy, Trajectory,
                    TrajectorySettings, Transition)


def word_level_t5_tokenizer(words, max_length: int):
    """A ``PreTrainedTokenizerFast`` over ``words`` that behaves like (U)T5's tokenizer where the pipelines care:
    ``<pad>`` = 0, ``</s>`` = 1 appended to every sequence, ``<unk>`` = 2, lower-cased, whitespace-split. For tiny
    test pipelines in the published layouts (the real tokenizers are too large to ship)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


# A complete spec over the toy parts (``{out}`` is the output directory), used by the core's tests.
TOY_SPEC = """\
output_dir: {out}
seed: 3
policy:
  type: toy
rewards:
  - type: toy_brightness
selector:
  type: toy_best_worst
objective:
  type: toy_dpo
  beta: 50
data:
  prompts: [a red ball, a blue cube, a green cone, a dark sky]
  eval_prompts: [a red cube, a blue ball]
train:
  steps: 6
  prompts_per_step: 2
  candidates_per_prompt: 3
  learning_rate: 0.003
checkpoint:
  every: 2
eval:
  videos: 1
logging:
  trackers: []
"""


# A policy plugin's tests through the real loop: ``policy_loop_spec(out, policy, seed, ONLINE_DPO)`` (or
# ``REWARD_GRADIENT``) trains ``policy`` (a YAML flow mapping) for 3 steps on the differentiable toy reward, with
# checkpoints at step 2; ``trained_rows`` reads back the steps that trained.
ONLINE_DPO = """\
selector: {type: best_worst, key: toy.brightness, min_gap: 0.0}
objective: {type: dpo, beta: 500, reference_update_every: 2}
train: {steps: 3, prompts_per_step: 1, candidates_per_prompt: 3, learning_rate: 0.01}
"""
REWARD_GRADIENT = """\
objective: {type: reward_gradient, cutoff: last, frames: one_random, rewards: {toy.brightness: {mode: maximize}}}
train: {steps: 3, prompts_per_step: 1, gradient_accumulation_steps: 2, learning_rate: 0.05}
"""

# For 1-process vs 2-process comparisons: each process samples one of a step's two prompts; the reference is
# refreshed after step 2. Adam's default eps (1e-8) turns the float noise of a gradient that is zero in exact
# arithmetic (CogVideoX's key-norm bias: softmax ignores a shift shared by all keys) into a step of the learning
# rate's size, a different one for each summation order; eps 1e-4 leaves the comparison at float noise.
TWO_PROCESS_DPO = """\
selector: {type: best_worst, key: toy.brightness, min_gap: 0.0}
objective: {type: dpo, beta: 500, reference_update_every: 2}
train: {steps: 3, prompts_per_step: 2, candidates_per_prompt: 3, learning_rate: 0.01, adam_epsilon: 1.0e-4}
"""


def policy_loop_spec(out: str | Path, policy: str, seed: int, section: str) -> str:
    return (f"output_dir: {out}\nseed: {seed}\npolicy: {policy}\nrewards: [{{type: toy_brightness, name: toy}}]\n"
            "data:\n  prompts: [a cat running, a red car in the city, a dog on the beach]\n"
            "checkpoint: {every: 2, keep_last: 3}\neval: {videos: 0}\nlogging: {trackers: []}\n" + section)


def trained_rows(output_dir: Path) -> list[dict]:
    """The metrics records of the steps that trained (not the start, not the final evaluation)."""
    import json

    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("step", 0) > 0 and not r.get("final") and "loss" in r]


def validated_example(path: str | Path, mode: str, needs: tuple[str, ...] = ()):
    """An example spec checked as ``vpo validate`` checks it, from the repository root its relative paths are
    written against (``examples/`` lies in it), then resolved. Skips the test when a plugin module in ``needs`` is
    not installed; asserts that the spec validates in ``mode`` ("online pairs", "rollout", ...); returns the
    ``ResolvedSpec``."""
    import contextlib
    import io
    import os

    import pytest

    for module in needs:
        pytest.importorskip(module)
    from .cli import main
    from .plugins import PluginManager
    from .spec import load_spec

    path, printed, cwd = Path(path).resolve(), io.StringIO(), os.getcwd()
    os.chdir(path.parents[1])
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(["validate", str(path)])
        assert code == 0 and f"valid ({mode}" in printed.getvalue(), printed.getvalue()
        return load_spec(path, PluginManager())
    finally:
        os.chdir(cwd)


def start_run(spec: str | Path, output_dir: str | Path, processes: int, *args: str,
              command: tuple[str, ...] = ("run",), **env: str):
    """``vpo run spec`` (or another ``command`` that writes to ``--out``, such as ``build-pairs``) started in fresh
    processes, as a user starts it: under torchrun (gloo on a CPU) when ``processes`` > 1, else plain python; one
    thread each -> the ``subprocess.Popen`` (text pipes). The toy parts are loaded, no installed plugin unless
    ``env`` sets ``VPO_LOAD_PLUGINS``; the spec's folder is on ``PYTHONPATH`` (for plugin modules written by a
    test)."""
    import os
    import subprocess
    import sys

    spec = Path(spec)
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update({"VPO_EXTRA_PLUGINS": "vpo_core.testing", "VPO_LOAD_PLUGINS": "none", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(spec.parent), os.environ.get("PYTHONPATH", "")]), **env})
    out = "--output-dir" if command == ("run",) else "--out"
    return subprocess.Popen([*head, "-m", "vpo_core.cli", *command, str(spec), "--no-progress", out,
                             str(output_dir), *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def launch_run(spec: str | Path, output_dir: str | Path, processes: int, *args: str, timeout: float = 300,
               command: tuple[str, ...] = ("run",), **env: str):
    """``start_run`` to the end -> a ``CompletedProcess``. Processes whose collectives do not match wait for each
    other forever: ``timeout`` (seconds) ends such a test."""
    import subprocess

    process = start_run(spec, output_dir, processes, *args, command=command, **env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_two_processes_equal_one(directory: Path, policy: str, plugin: str, atol: float, *args: str,
                                   fsdp: bool = False) -> dict:
    """Train ``policy`` (a YAML flow mapping of plugin ``plugin``) with ``TWO_PROCESS_DPO`` on 1 process and on 2
    (FSDP2 if ``fsdp``, else DDP), ``args`` added to both command lines; assert that both step-3 checkpoints hold
    the same weights within ``atol`` and return the 1-process one. The runs are ``directory``/1 and /2, the spec
    ``directory``/spec.yaml."""
    from safetensors.torch import load_file

    spec = Path(directory) / "spec.yaml"
    spec.write_text(policy_loop_spec(Path(directory) / "unused", policy, 5, TWO_PROCESS_DPO))
    one, two = [], []
    for processes, out in ((1, one), (2, two)):
        engine = {"ACCELERATE_USE_FSDP": "true"} if fsdp and processes > 1 else {}
        done = launch_run(spec, Path(directory) / str(processes), processes, *args,
                          VPO_LOAD_PLUGINS=f"{plugin},onlinevpo", **engine)
        assert done.returncode == 0, done.stderr
        out.append(load_file(str(Path(directory) / str(processes) / "checkpoints" / "step-000003" /
                                 "policy.safetensors")))
    assert one[0].keys() == two[0].keys()
    for key in one[0]:
        torch.testing.assert_close(one[0][key], two[0][key], atol=atol, rtol=0, msg=key)
    return one[0]


def assert_full_finetuning_trained(checkpoint: dict, untrained: TrainableModule, prefix: str) -> None:
    """Some weight of ``untrained`` (a policy's trainable module as built, full fine-tuning) under ``prefix`` differs
    in ``checkpoint`` (a policy checkpoint's state), and the frozen reference under ``prefix`` was saved too."""
    assert any(key.startswith(f"reference.{prefix}") for key in checkpoint)
    assert any(not torch.equal(value, checkpoint[f"module.{name}"]) for name, value in
               untrained.module.named_parameters() if name.startswith(prefix))


def fsdp_units(trainable: TrainableModule) -> list[str]:
    """Names of the submodules of ``trainable.module`` that ``trainable.shard()`` makes FSDP2 units (blocks whose
    weights are gathered one at a time), sharded inside a gloo process group of this one process."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainable.shard()
    finally:
        dist.destroy_process_group()
    return [name for name, m in trainable.module.named_modules() if name and isinstance(m, FSDPModule)]


def lora_placement(policy, targets: list[str]) -> tuple[list[str], list[str]]:
    """(modules that carry the learner's LoRA adapter, modules of the trainable module whose name matches one of
    ``targets`` as peft matches them: the name or its dotted suffix), for tests that ``lora.target_modules`` is
    honoured: the two lists must be equal and not empty."""
    names = [n for n, _ in policy.trainable.module.named_modules()
             if n and not any(part.startswith(("lora_", "base_layer")) or part in ("default", "reference")
                              for part in n.split("."))]
    matching = sorted(n for n in names if any(n == t or n.endswith("." + t) for t in targets))
    return policy.trainable.adapted_module_names(), matching


class ToyPolicyConfig(PolicyConfig):
    capabilities: ClassVar[frozenset[str]] = frozenset({"trajectories"})
    frames: int = 4
    size: int = 8
    hidden: int = 32
    steps: int = 4
    train_timesteps: int = 100
    text_buckets: int = 64


def _prompt_ids(prompt: str, buckets: int) -> list[int]:
    return [int(hashlib.md5(w.encode()).hexdigest(), 16) % buckets for w in prompt.lower().split()] or [0]


class ToyDenoiser(nn.Module):
    def __init__(self, hidden: int, buckets: int) -> None:
        super().__init__()
        self.text = nn.EmbeddingBag(buckets, hidden, mode="mean")
        self.time = nn.Linear(1, hidden)
        self.inp = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.movedim(2, -1))  # [B,T,H,W,hidden]
        cond = self.text(ids, offsets) + self.time(t.float().unsqueeze(-1) / 1000)
        h = torch.nn.functional.silu(h + cond[:, None, None, None, :])
        return self.out(h).movedim(-1, 2)


class ToyPolicy(TrainablePolicy):
    """Full fine-tuning of a per-pixel denoiser; the reference is the TrainableModule's frozen copy."""

    def __init__(self, config: ToyPolicyConfig, context: BuildContext) -> None:
        self.config = config
        self.device = context.device
        torch.manual_seed(context.seed)
        self.trainable = TrainableModule(ToyDenoiser(config.hidden, config.text_buckets).to(self.device), None,
                                         context.seed)
        self.net = self.trainable.module
        betas = torch.linspace(1e-3, 0.2, config.train_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).to(self.device)

    def _eps(self, x, t, prompts):
        ids = [torch.tensor(_prompt_ids(p, self.config.text_buckets)) for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.trainable.forward_module(x, t, torch.cat(ids).to(self.device), offsets.to(self.device))

    def _shape(self, b: int) -> tuple[int, ...]:
        return (b, self.config.frames, 3, self.config.size, self.config.size)

    # -- protocol
    def sample(self, prompts, seeds, *, decode=True, gradient: GradientWindow | None = None) -> Rollout:
        x = randn_rows(self._shape(1)[1:], row_generators(seeds), self.device)
        ts = torch.linspace(self.config.train_timesteps - 1, 0, self.config.steps).long().tolist()
        window = 0
        if gradient is not None:
            window = gradient.last_steps
            if gradient.random_cutoff:
                g = torch.Generator().manual_seed(seeds[0])
                window = int(torch.randint(1, gradient.last_steps + 1, (1,), generator=g))
        for i, t in enumerate(ts):
            with torch.set_grad_enabled(gradient is not None and i >= len(ts) - window):
                a = self.alphas_cumprod[t]
                a_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
                eps = self._eps(x, torch.full((x.shape[0],), t, device=self.device), prompts)
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        frames = self.decode(x) if decode and gradient is None else None
        return Rollout(latents=x if gradient is not None else x.detach(), prompts=list(prompts),
                       seeds=list(seeds), frames=frames)

    # -- trajectories (GRPO): DDIM with eta, the DDPO transition
    def _schedule(self) -> list[int]:
        return torch.linspace(self.config.train_timesteps - 1, 0, self.config.steps).long().tolist()

    def _distribution(self, x, steps: torch.Tensor, prompts, eta: float):
        ts = torch.tensor(self._schedule() + [-1], device=self.device)
        t, t_prev = ts[steps], ts[steps + 1]
        a = self.alphas_cumprod[t]
        a_prev = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], torch.ones_like(a))
        eps = self._eps(x, t, prompts)
        shape = (-1, *[1] * (x.dim() - 1))
        x0 = (x - (1 - a).view(shape).sqrt() * eps) / a.view(shape).sqrt()
        return ddim_step(x, x0, eps, a, a_prev, eta)

    def sample_trajectory(self, prompts, seeds, settings: TrajectorySettings, *, decode=True) -> Trajectory:
        generators = row_generators(seeds)
        x = randn_rows(self._shape(1)[1:], generators, self.device)
        count = len(self._schedule())
        start, end = settings.window or (0, count)
        chain, stochastic = [x], []
        log_probs = torch.full((len(seeds), count), float("nan"))
        with torch.no_grad():
            for i in range(count):
                eta = settings.noise_level if start <= i < end else 0.0
                mean, std = self._distribution(x, torch.full((len(seeds),), i), prompts, eta)
                if eta > 0 and bool((std > 0).all()):  # the last step into alpha = 1 has std 0: deterministic
                    x, log_probs[:, i] = stochastic_step(mean, std, generators)
                    stochastic.append(i)
                else:
                    x = mean
                chain.append(x)
        latents = torch.stack(chain, dim=1)
        return Trajectory(latents, log_probs, stochastic, list(prompts), list(seeds), settings,
                          self.decode(x) if decode else None)

    def transition(self, trajectory: Trajectory, rows: list[int], steps: list[int]) -> Transition:
        row, step = torch.tensor(rows), torch.tensor(steps)
        mean, std = self._distribution(trajectory.latents[row, step], step, [trajectory.prompts[r] for r in rows],
                                       trajectory.settings.noise_level)
        return Transition(gaussian_log_prob(trajectory.latents[row, step + 1], mean, std), mean, std)

    def decode(self, latents, frame_indices=None):
        if frame_indices is not None:
            latents = latents[:, frame_indices]
        return torch.sigmoid(latents)

    def encode(self, frames):
        return torch.logit(frames.clamp(1e-4, 1 - 1e-4))

    def sample_timesteps(self, batch_size, generator):
        return torch.randint(0, self.config.train_timesteps, (batch_size,), generator=generator).to(self.device)

    def sample_noise(self, latents, generator):
        return torch.randn(latents.shape, generator=generator).to(latents)

    def denoising_loss(self, latents, prompts, timesteps, noise):
        a = self.alphas_cumprod[timesteps].view(-1, *[1] * (latents.dim() - 1))
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self._eps(noisy, timesteps, prompts)
        return ((pred.float() - noise.float()) ** 2).mean(dim=tuple(range(1, latents.dim())))

    def save_pretrained(self, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(Path(directory) / "toy.safetensors"))


class ToyRewardConfig(RewardConfig):
    differentiable: ClassVar[bool] = True
    dimensions: list[Literal["brightness", "smoothness"]] = ["brightness", "smoothness"]

    def score_dimensions(self) -> list[str]:
        return list(self.dimensions)


class ToyReward:

    def __init__(self, config: ToyRewardConfig, context: BuildContext) -> None:
        self.dimensions = tuple(config.dimensions)

    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        if "brightness" in self.dimensions:
            out["brightness"] = frames.mean(dim=(1, 2, 3, 4))
        if "smoothness" in self.dimensions:
            diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4)) if frames.shape[1] > 1 else 0 * frames[:, 0, 0, 0, 0]
            out["smoothness"] = 1 - diff
        return out


class ToySelectorConfig(SelectorConfig):
    key: str = "total"
    min_gap: float = 0.0

    def score_keys(self) -> list[str]:
        return [self.key]


class ToySelector:
    def __init__(self, config: ToySelectorConfig, context: BuildContext) -> None:
        self.config = config

    def select(self, scores: dict[str, torch.Tensor]) -> list[Pair]:
        grid = scores[self.config.key]
        pairs = []
        for p in range(grid.shape[0]):
            best, worst = int(grid[p].argmax()), int(grid[p].argmin())
            gap = float(grid[p, best] - grid[p, worst])
            if gap > self.config.min_gap:
                pairs.append(Pair(p, best, worst, 1.0, gap))
        return pairs


class ToyDPOConfig(ObjectiveConfig):
    beta: float = 50.0
    shared_noise: bool = True
    reference_update_every: int = 0


class ToyDPO(Objective):
    def __init__(self, config: ToyDPOConfig, context: BuildContext) -> None:
        self.config = config

    def loss(self, policy, batch: PairBatch, ctx: StepContext) -> ObjectiveOutput:
        return dpo_pair_loss(policy, batch, ctx.generator, self.config.beta, self.config.shared_noise)

    def after_optimizer_step(self, step: int, policy) -> dict[str, float]:
        k = self.config.reference_update_every
        if k and step % k == 0:
            policy.update_reference()
            return {"reference_updated": 1.0}
        return {}


class ToyRewardGradientConfig(ObjectiveConfig):
    requires: ClassVar[str] = "rollout"
    last_steps: int = 1

    def score_keys(self) -> list[str]:
        return ["total"]


class ToyRewardGradient(Objective):
    def __init__(self, config: ToyRewardGradientConfig, context: BuildContext) -> None:
        self.config = config

    def loss(self, policy, batch: PromptBatch, ctx: StepContext) -> ObjectiveOutput:
        rollout = policy.sample(batch.prompts, batch.seeds, gradient=GradientWindow(self.config.last_steps))
        scores = ctx.score(policy.decode(rollout.latents), batch.prompts)
        return ObjectiveOutput(loss=-scores["total"].mean(), scores={k: v.detach() for k, v in scores.items()})


@hookimpl
def vpo_register_policies(register):
    register("toy", ToyPolicy, ToyPolicyConfig)


@hookimpl
def vpo_register_rewards(register):
    register("toy_brightness", ToyReward, ToyRewardConfig)


@hookimpl
def vpo_register_pair_selectors(register):
    register("toy_best_worst", ToySelector, ToySelectorConfig)


@hookimpl
def vpo_register_objectives(register):
    register("toy_dpo", ToyDPO, ToyDPOConfig)
    register("toy_reward_gradient", ToyRewardGradient, ToyRewardGradientConfig)
