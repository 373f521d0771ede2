"""The one training loop, on accelerate, for any number of processes.

Modes (from what the objective requires and the spec's data): online pairs (the current policy samples N
candidates per prompt -> rewards -> selector -> objective), offline pairs (a stored pair dataset) and rollout
(the objective back-propagates a differentiable reward through a sampled video).

One optimizer step = collect every micro-step's batch, then learn: each chunk's loss is weighted by its share of
the step's rows, so the update is the mean over all rows of the step, however they are split into micro-steps,
chunks or processes. A micro-step's global batch and every random draw (prompts, candidate seeds, the
objective's noise) are functions of (seed, position in the data stream) alone; each process takes a contiguous
share of the rows. So the same spec ends with the same weights on 1 or N processes (float tolerance), and a
resumed run equals an uninterrupted one. Gradients are synchronised by the engine (DDP's bucketed all-reduce,
FSDP2's reduce-scatter) on the last backward of a step only; only the main process writes files.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .assembly import Parts, build_parts, call, check_pairs, check_rows, make_accelerator
from .data import PairDataset, derive_seed, ordered_indices, pairs_to_batch
from .errors import RunError, SpecError
from .spec import ResolvedSpec
from .types import Batch, Pair, PairBatch, PromptBatch, StepContext, TrajectoryBatch, TransitionBatch

METRICS, EVALS, CHANGES = "metrics.jsonl", "eval.jsonl", "spec_changes.jsonl"
# Spec fields that may change on --resume (docs/spec.md); any other difference needs --allow-spec-change.
RESUMABLE = ("output_dir", "train.steps", "checkpoint.", "eval.every", "eval.videos", "eval.video_format",
             "eval.fps", "eval.video_scale", "logging.")


class Skip(enum.Enum):
    """Why a step trained nothing (its weights are untouched)."""

    NO_PAIRS = "no_pairs"  # every prompt's candidates tied within the selector's min_gap
    NO_TRANSITIONS = "no_transitions"  # the objective's expand() chose no transition on any process
    NONFINITE = "nonfinite"  # a reward, loss or gradient was not finite
    FP16_OVERFLOW = "fp16_overflow"  # fp16 gradients overflowed: the loss scaler skipped the update, lowered its scale


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    interrupted: bool = False
    exit_code: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    wall_time: float = 0.0


def lr_lambda(kind: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if kind != "constant" and warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 1.0
    return fn


class _StopFlag:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit. A second Ctrl-C interrupts at once; repeated
    SIGTERMs do not (launchers such as torchrun send more than one while shutting down)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\nvpo: received {signal.Signals(signum).name}; finishing this step, then saving a checkpoint",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, resolved: ResolvedSpec, *, resume: bool = False, progress: bool = True,
                 output_dir: str | Path | None = None, allow_spec_change: bool = False) -> None:
        self.r, self.spec = resolved, resolved.spec
        self.output_dir = Path(output_dir or self.spec.output_dir)
        self.resume, self.progress, self.allow_spec_change = resume, progress, allow_spec_change
        self.lock: ckpt.RunLock | None = None
        self.stop_asked, self.stop_agreed = False, None  # a signal arrived / every process agreed to stop

    # ------------------------------------------------------------------------------------------ set-up
    def _open_run_dir(self) -> Path | None:
        """Create/lock the output directory (main process) -> the checkpoint to resume from, if any."""
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise SpecError(f"output_dir '{out}' exists and is not a directory", "output_dir")
        try:
            out.mkdir(parents=True)
            self.created_dir = True
        except FileExistsError:
            pass
        self.lock = ckpt.RunLock(out)  # exits 2 naming the holder if another run has it
        ckpt.clean_partial(out)  # safe: no other run can be writing here while we hold the lock
        has_work = ckpt.list_checkpoints(out) or (out / METRICS).exists() or (out / "final").exists()
        if has_work and not self.resume:
            raise SpecError(f"output_dir '{out}' already holds a run; continue it with --resume, or choose another "
                            f"output_dir (nothing was changed)", "output_dir")
        latest = ckpt.resumable_checkpoint(out) if self.resume else None
        if self.resume and latest is None:
            print(f"vpo: --resume: no checkpoint in '{out}', starting from step 0", file=sys.stderr)
        return latest

    def _setup(self) -> Path | None:
        acc = self.accelerator = make_accelerator(self.r, self.output_dir)
        self.main, self.world, self.rank = acc.is_main_process, acc.num_processes, acc.process_index
        t = self.spec.train
        key = "pairs_per_step" if self.r.mode == "offline pairs" else "prompts_per_step"
        if getattr(t, key) % self.world:
            raise SpecError(f"{getattr(t, key)} is not divisible by the {self.world} processes; each process takes an "
                            f"equal share of a micro-step's rows", f"train.{key}")
        outcome: list[Any] = [None]
        if self.main:
            try:
                outcome = [self._open_run_dir()]
            except SpecError as exc:
                outcome = [exc]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            outcome = broadcast_object_list(outcome)
        if isinstance(outcome[0], SpecError):
            raise outcome[0]
        self.parts: Parts = build_parts(self.r, acc, self.output_dir)
        p = self.parts
        self.policy = p.policy
        self.pair_data = None
        if self.r.mode == "offline pairs":
            data = call(self.r.objective, "open_pair_dataset()", p.objective.open_pair_dataset, self.spec.data.pairs,
                        self.spec.data.pairs_format, p.policy)
            if data is None and self.spec.data.pairs_format != "vpo":
                raise SpecError(f"pairs_format '{self.spec.data.pairs_format}' is not understood by objective "
                                f"'{self.r.objective.part_type.name}'; use 'vpo'", "data.pairs_format")
            self.pair_data = data if data is not None else PairDataset(self.spec.data.pairs)
        self.policy.train(True)  # sampling switches to eval mode and back; losses run in train mode
        self.fsdp = False
        if self.world > 1:  # the engine synchronises gradients: FSDP2 shards the module, DDP wraps it
            from accelerate.utils import DistributedType

            self.fsdp = acc.distributed_type == DistributedType.FSDP or \
                os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # accelerate has no FSDP on CPUs
            if self.fsdp:
                self.policy.trainable.shard()
            else:
                self.policy.trainable.wrap(lambda module: _ddp(acc, module))
        params = [q for q in self.policy.trainable_parameters() if q.requires_grad]
        if not params:
            raise SpecError("the policy has no trainable parameters; check its LoRA / fine-tuning settings", "policy")
        # fused: one kernel for all tensors (torch defaults to a kernel per op, or per tensor on CPUs)
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_epsilon,
                                      weight_decay=t.weight_decay, fused=True)
        self.updates = self.r.objective.config.updates_per_batch()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler, t.warmup_steps,
                                                                                t.steps * self.updates))
        self.optimizer = acc.prepare_optimizer(optimizer)
        # accelerate's wrapper only adds the fp16 loss scaler; without one it forwards, after probing for optional
        # packages on every call (0.1 ms a step), so the loop calls the optimizer itself
        self._stepper = self.optimizer if self.optimizer.scaler is not None else optimizer
        self.params = params
        if self.r.trackers and self.main:
            acc.init_trackers(self.spec.logging.project, config=_flat(self.r.to_dict()),
                              init_kwargs={"wandb": {"name": self.spec.logging.run_name}}
                              if self.spec.logging.run_name and "wandb" in self.r.trackers else {})
        return outcome[0]

    # ------------------------------------------------------------------------------------------ collect
    def _share(self, rows: int) -> range:
        """This process's contiguous share of a micro-step's ``rows`` (equal shares)."""
        n = rows // self.world
        return range(self.rank * n, (self.rank + 1) * n)

    def _sampled(self, step: int, micro: int, metrics: dict, trajectories: bool):
        """This process's share of the micro-step's prompts, N candidates (or G chains) each, sampled by the
        current policy and scored; the scores of every process are gathered: (share, first, prompts, sampled,
        local scores, {key: [P, N]}), or None when a score is not finite."""
        t, seed, n = self.spec.train, self.spec.seed, self.spec.train.candidates_per_prompt
        first = ((step - 1) * t.gradient_accumulation_steps + micro) * t.prompts_per_step  # stream position
        mine = self._share(t.prompts_per_step)
        prompts = [self.parts.train_prompts[i] for i in
                   ordered_indices(len(self.parts.train_prompts), seed, first + mine.start, len(mine))]
        rows = [pr for pr in prompts for _ in range(n)]
        seeds = [derive_seed(seed, "sample", first + g, j) for g in mine for j in range(n)]
        name = "sample_trajectory()" if trajectories else "sample()"
        self.policy.train(False)
        with torch.no_grad():
            if trajectories:
                out = call(self.r.policy, name, self.policy.sample_trajectory, rows, seeds,
                           self.parts.objective.trajectory_settings())
            else:
                out = call(self.r.policy, name, self.policy.sample, rows, seeds)
            check_rows(self.r.policy, f"{name} latents", out.latents, len(rows))
            scores = self.parts.rewards.score(check_rows(self.r.policy, f"{name} frames", out.frames, len(rows)), rows)
        self.policy.train(True)
        grid = self._gather_grid(scores, len(mine), n)
        for key, value in grid.items():
            metrics[f"reward/{key}"] = value.float().mean().item()
        if not all(torch.isfinite(v).all() for v in grid.values()):
            return None
        return mine, first, prompts, out, scores, grid

    def _online(self, step: int, micro: int, metrics: dict) -> tuple[Batch | None, int] | None:
        sampled = self._sampled(step, micro, metrics, trajectories=False)
        if sampled is None:
            return None
        mine, first, prompts, rollout, _, grid = sampled
        p, n = self.spec.train.prompts_per_step, self.spec.train.candidates_per_prompt
        pairs = check_pairs(self.r.selector, call(self.r.selector, "select()", self.parts.selector.select, grid), p, n)
        metrics["pairs"] = metrics.get("pairs", 0) + len(pairs)
        local = [Pair(q.prompt_index - mine.start, q.winner, q.loser, q.weight, q.margin)
                 for q in pairs if q.prompt_index in mine]
        noise_seeds = [derive_seed(self.spec.seed, "noise", first + mine.start + q.prompt_index, q.winner, q.loser)
                       for q in local]
        if not local and pairs:  # another process trains; this one still takes part in the gradient sync
            local, noise_seeds = [Pair(0, 0, 1, 0.0)], [0]
        batch = pairs_to_batch(local, rollout.latents, prompts, n) if local else None
        if batch is not None:
            batch.seeds = noise_seeds
        return batch, len(pairs)

    def _trajectories(self, step: int, micro: int, metrics: dict) -> tuple[Batch, int] | None:
        sampled = self._sampled(step, micro, metrics, trajectories=True)
        if sampled is None:
            return None
        mine, _, prompts, trajectory, scores, grid = sampled
        g = self.spec.train.candidates_per_prompt
        return TrajectoryBatch(trajectory, [p for p in prompts for _ in range(g)], scores,
                               [i for i in mine for _ in range(g)], grid), len(trajectory.seeds)

    def _offline(self, step: int, micro: int, metrics: dict) -> tuple[Batch, int]:
        t = self.spec.train
        first = ((step - 1) * t.gradient_accumulation_steps + micro) * t.pairs_per_step
        mine = self._share(t.pairs_per_step)
        batch = self.pair_data.batch(ordered_indices(len(self.pair_data), self.spec.seed, first + mine.start,
                                                     len(mine)))
        batch.seeds = [derive_seed(self.spec.seed, "noise", first + g) for g in mine]
        metrics["pairs"] = metrics.get("pairs", 0) + t.pairs_per_step
        return batch, t.pairs_per_step

    def _rollout(self, step: int, micro: int, metrics: dict) -> tuple[Batch, int]:
        t = self.spec.train
        first = ((step - 1) * t.gradient_accumulation_steps + micro) * t.prompts_per_step
        mine = self._share(t.prompts_per_step)
        idx = ordered_indices(len(self.parts.train_prompts), self.spec.seed, first + mine.start, len(mine))
        return (PromptBatch([self.parts.train_prompts[i] for i in idx],
                            [derive_seed(self.spec.seed, "rollout", first + g) for g in mine]), t.prompts_per_step)

    # ------------------------------------------------------------------------------------------ learn
    def train_step(self, step: int) -> tuple[dict[str, Any], Skip | None]:
        """One optimizer step -> (metrics, why it trained nothing or None). Non-finite rewards, losses or gradients
        skip the update (weights untouched)."""
        t, seed = self.spec.train, self.spec.seed
        metrics: dict[str, Any] = {"lr": self.optimizer.optimizer.param_groups[0]["lr"]}  # the rate this step uses
        # dropout etc. independent of history; on a CPU-only run the CPU generator is all there is (torch.manual_seed
        # would also queue a CUDA seeding with a formatted stack trace: 0.3 ms a step)
        seeded = torch.manual_seed if self.accelerator.device.type != "cpu" else torch.default_generator.manual_seed
        seeded(derive_seed(seed, "torch", step, self.rank))
        collect = {"rollout": self._rollout, "offline pairs": self._offline, "online pairs": self._online,
                   "trajectories": self._trajectories}[self.r.mode]
        batches, total, reason = [], 0, None
        for micro in range(t.gradient_accumulation_steps):
            got = collect(step, micro, metrics)
            if got is None:
                reason = Skip.NONFINITE
                break
            batch, rows = got
            total += rows
            if batch is not None:
                batches.append((micro, batch))
        if reason is None and total == 0:
            reason = Skip.NO_PAIRS
        for update in range(self.updates if reason is None else 0):  # GRPO's inner epochs: several updates
            todo = [(micro, call(self.r.objective, "expand()", self.parts.objective.expand, batch,
                                 self._context(step, micro, update))) for micro, batch in batches]
            if self.r.mode == "trajectories":  # expand() chose the transitions: count them over every process
                total = int(self._sum(float(sum(len(b) for _, b in todo))))
                if total == 0:  # e.g. an objective that drops groups whose rewards all tie
                    reason = Skip.NO_TRANSITIONS if update == 0 else None  # (earlier updates did train)
                    break
            reason = self._learn(step, todo, total, metrics, update)
            # The gradients' norm (the same on every process once they are synchronised) also tells whether any
            # is non-finite; clipping with an infinite bound only measures.
            norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm or math.inf) \
                if reason is None else None
            if norm is not None and not math.isfinite(float(norm)):
                # with fp16's loss scaler that is its routine overflow, which its step() turns into a lower scale
                reason = Skip.NONFINITE if self.optimizer.scaler is None else Skip.FP16_OVERFLOW
            if reason is None:
                metrics["grad_norm"] = float(norm)
                self._stepper.step()
                self.scheduler.step()
            elif reason is Skip.FP16_OVERFLOW:
                self._stepper.step()  # the scaler leaves the weights untouched
            self._stepper.zero_grad(set_to_none=True)  # no gradients are held between steps (or kept by a skip)
            if reason is not None:
                break
            metrics.update({f"objective/{k}": v for k, v in
                            call(self.r.objective, "after_optimizer_step()", self.parts.objective.after_optimizer_step,
                                 step, self.policy).items()})
        metrics["skipped"] = int(reason is not None)
        if reason is not None:
            metrics["skip_reason"] = reason.value  # for metrics.jsonl and the report
        return metrics, reason

    def _context(self, step: int, micro: int, update: int = 0) -> StepContext:
        gen = torch.Generator().manual_seed(derive_seed(self.spec.seed, "step", step, micro, update))
        return StepContext(step=step, generator=gen, score=self.parts.rewards.score, update=update)

    def _sum(self, value: float) -> float:
        if self.world == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor([value], device=self.accelerator.device), "sum").item())

    def _learn(self, step: int, batches: list[tuple[int, Batch]], total: int, metrics: dict,
               update: int = 0) -> Skip | None:
        size = self.spec.train.pair_batch_size
        chunks = [(micro, b.take(s) if size else b, False) for micro, b in batches
                  for s in (_slices(len(b), size) if size else [None]) if len(b)]
        if not chunks and batches and isinstance(batches[0][1], TransitionBatch):
            # expand() chose transitions on another process only: this one takes part in the gradient sync with
            # one transition, weighted 0
            micro, batch = batches[0]
            chunks = [(micro, replace(batch, rows=[0], steps=batch.trajectory.steps[:1],
                                      advantages=torch.zeros(1)), True)]
        if self.fsdp and size and chunks:  # under FSDP2 every forward pass is a collective: a process with fewer
            # chunks (fewer pairs) than another repeats its last one, weighted 0
            most = torch.tensor([len(chunks)], device=self.accelerator.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            chunks += [(*chunks[-1][:2], True)] * (int(most) - len(chunks))
        wrapped = self.policy.trainable.forward_module if self.world > 1 else None
        sums: dict[str, float] = {}
        loss_sum, bad = 0.0, False
        for i, (micro, chunk, padding) in enumerate(chunks):
            rows = 0 if padding or (isinstance(chunk, PairBatch) and float(chunk.weights.sum()) == 0) else len(chunk)
            ctx = self._context(step, micro, update)
            sync = wrapped is None or i == len(chunks) - 1
            with (contextlib.nullcontext() if sync else _no_sync(self.accelerator, wrapped)):
                with self.accelerator.autocast():
                    out = call(self.r.objective, "loss()", self.parts.objective.loss, self.policy, chunk, ctx)
                # mean over the rows of the whole step (and of every process: the engine averages over them)
                self.accelerator.backward(out.loss * (len(chunk) / total * self.world if rows else 0.0))
            finite = bool(torch.isfinite(out.loss).all()) and all(torch.isfinite(v).all() for v in out.scores.values())
            bad = bad or not finite
            loss_sum += float(out.loss.detach()) * rows
            for k, v in [*out.metrics.items(), *((f"reward/{k}", float(v.float().mean())) for k, v in
                                                 out.scores.items())]:
                key = k if k.startswith("reward/") else f"objective/{k}"
                sums[key] = sums.get(key, 0.0) + float(v) * rows
        keys = sorted(sums)
        totals = torch.tensor([float(bad), float(self.stop_asked), loss_sum, *(sums[k] for k in keys)],
                              dtype=torch.float64)
        if self.world > 1:  # one small all-reduce: skip, stop, and the step's metrics, over every process
            totals = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").cpu()
            self.stop_agreed = bool(totals[1] > 0)
        metrics.update({k: float(v) / total for k, v in zip(keys, totals[3:])})
        if totals[0] > 0:
            return Skip.NONFINITE
        metrics["loss"] = float(totals[2]) / total
        return None

    def _gather_grid(self, scores: dict, prompts: int, candidates: int) -> dict:
        """This process's scores -> every process's, as {key: [P, N]} (one all-gather for all keys)."""
        keys = list(scores)
        stacked = torch.stack([scores[k].reshape(prompts, candidates) for k in keys], dim=1)  # [p, K, N]
        if self.world > 1:  # on the engine's device (NCCL gathers only CUDA tensors; a policy may decode to the CPU)
            stacked = self.accelerator.gather(stacked.to(self.accelerator.device).contiguous())
        return {k: stacked[:, i] for i, k in enumerate(keys)}

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        """Held-out prompts x seeds (the same every evaluation), split over processes and gathered."""
        from .report import mean_sem
        from .video import write_video

        p, e = self.parts, self.spec.eval
        if not p.eval_prompts or not p.rewards:
            return {}
        rows = [pr for pr in p.eval_prompts for _ in range(e.seeds_per_prompt)]
        seeds = [derive_seed(self.spec.seed, "eval", i) for i in range(len(rows))]
        per = -(-len(rows) // self.world)
        mine = range(min(len(rows), self.rank * per), min(len(rows), (self.rank + 1) * per))
        # every process samples `per` rows, a short share padded with row 0: under FSDP2 each forward pass is a
        # collective, so all processes must make the same calls
        todo = [*mine, *[0] * (per - len(mine))]
        self.policy.train(False)
        with torch.no_grad():
            rollout = call(self.r.policy, "sample()", self.policy.sample, [rows[i] for i in todo],
                           [seeds[i] for i in todo])
            check_rows(self.r.policy, "sample() frames", rollout.frames, len(todo))
            scores = p.rewards.score(rollout.frames[:len(mine)], rows[mine.start:mine.stop]) if len(mine) else {}
        self.policy.train(True)
        records = [{k: _finite_or_none(v[i]) for k, v in scores.items()} for i in range(len(mine))]
        videos = [(r, (rollout.frames[r - mine.start].detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
                  for r in mine if r % e.seeds_per_prompt == 0 and r // e.seeds_per_prompt < e.videos]
        if self.world > 1:
            records, videos = _gather_to_main(records), _gather_to_main(videos)
        if not self.main:
            return {}
        keys = list(records[0]) if records else []
        record = {"step": step, "final": final, "prompts": rows, "seeds": seeds,
                  "scores": {k: [r[k] for r in records] for k in keys}}
        with open(self.output_dir / EVALS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for row, frames in videos:
            path = self.output_dir / "samples" / ckpt.step_dir_name(step) / \
                f"prompt-{row // e.seeds_per_prompt:02d}.{e.video_format}"
            write_video(path, frames, e.fps, e.video_scale)
        out = {}
        for k in keys:
            values = [v for v in record["scores"][k] if v is not None]
            if len(values) < len(rows):
                print(f"vpo: warning: {len(rows) - len(values)} of {len(rows)} held-out videos have no '{k}' score "
                      f"(NaN); the mean is over the others", file=sys.stderr)
                out[f"eval/{k}_nan"] = len(rows) - len(values)
            if values:
                out[f"eval/{k}"], out[f"eval/{k}_sem"] = mean_sem(values)
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(self, step: int, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if self.fsdp:
            self.policy.trainable.reshard()  # after a step that trained nothing or an evaluation, the root is gathered
        policy_state = self.policy.state_dict_for_checkpoint()  # every process: gathers FSDP shards
        optim_state = get_optimizer_state_dict(self.policy.trainable.module, self.optimizer.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.optimizer.scaler is not None:  # fp16: the loss scale found so far (a fresh one overflows again)
            state = {**state, "loss_scaler": self.optimizer.scaler.state_dict()}
        if self.main:
            ckpt.save_checkpoint(self.output_dir, step, policy_state=policy_state, optimizer_state=optim_state,
                                 scheduler_state=self.scheduler.state_dict(), trainer_state=state,
                                 keep_last=self.spec.checkpoint.keep_last)
        self.accelerator.wait_for_everyone()

    def _restore(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        data = ckpt.load_checkpoint(path)
        state = data["state"]
        self._check_resumed_spec(state, path)
        self.policy.load_state_dict_from_checkpoint(data["policy"])
        set_optimizer_state_dict(self.policy.trainable.module, self.optimizer.optimizer, data["optimizer"],
                                 options=StateDictOptions(full_state_dict=self.world > 1))
        self.scheduler.load_state_dict(data["scheduler"])
        if self.optimizer.scaler is not None and state.get("loss_scaler"):
            self.optimizer.scaler.load_state_dict(state["loss_scaler"])
        if self.allow_spec_change:  # the new spec's optimizer settings apply for real, learning rate included
            t = self.spec.train
            self.scheduler.base_lrs = [t.learning_rate for _ in self.scheduler.base_lrs]
            self.scheduler.lr_lambdas = [lr_lambda(t.lr_scheduler, t.warmup_steps, t.steps * self.updates)]
            for group in self.optimizer.optimizer.param_groups:
                group.update(lr=t.learning_rate * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch),
                             betas=tuple(t.adam_betas), eps=t.adam_epsilon, weight_decay=t.weight_decay)
        # The loop re-seeds every step from (seed, step), so these only restore the global RNGs for plugins.
        ckpt.set_rng_state(state["rng"], data["rng_tensors"])
        self.parts.objective.load_state_dict(state.get("objective", {}))
        return state

    def _check_resumed_spec(self, state: dict, path: Path) -> None:
        old, new = _flat(state.get("spec", {})), _flat(self.r.to_dict())
        changes = [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k) and not k.startswith(RESUMABLE) and old]
        if changes and not self.allow_spec_change:
            raise SpecError(f"the spec differs from the one checkpoint {path.name} was made with:\n    "
                            + "\n    ".join(changes) + "\n  resume with the old values, or apply the new ones with "
                            "--resume --allow-spec-change (both specs and the step are recorded in "
                            f"{CHANGES})")
        if changes and self.main:
            with open(self.output_dir / CHANGES, "a") as fh:
                fh.write(json.dumps({"step": state["step"], "changes": changes, "before": state.get("spec"),
                                     "after": self.r.to_dict()}) + "\n")

    # ------------------------------------------------------------------------------------------ run
    def _log(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.output_dir / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=record["step"])

    def run(self) -> RunResult:
        start = time.time()
        self.created_dir, self.trained, failed_early = False, False, False
        try:
            latest = self._setup()
            start_step, counters = 0, {**{f"skipped_{reason.value}": 0 for reason in Skip}, "consecutive_nonfinite": 0}
            if latest is not None:
                state = self._restore(latest)
                start_step = state["step"]
                counters.update(state.get("counters", {}))
                if self.main:
                    _truncate_jsonl(self.output_dir / METRICS, start_step)
                    _truncate_jsonl(self.output_dir / EVALS, start_step)
                if self.main:
                    print(f"vpo: resumed from {latest} (step {start_step})", file=sys.stderr)
            elif self.main and self.resume:  # killed before its first checkpoint: start over
                _truncate_jsonl(self.output_dir / METRICS, -1)
                _truncate_jsonl(self.output_dir / EVALS, -1)
            if self.main:
                (self.output_dir / "spec.resolved.json").write_text(json.dumps(self.r.to_dict(), indent=1))
            if start_step == 0:
                self._log({"step": 0, **self.evaluate(0), "time": time.time()})
            result = self._train(start_step, counters)
            if result.interrupted:
                return result
            result.final_metrics = self.evaluate(self.spec.train.steps, final=True)
            if result.final_metrics:
                self._log({"step": self.spec.train.steps, "final": 1, **result.final_metrics})
            self._write_final()
            if self.main:
                from .report import write_report

                write_report(self.output_dir)
            self.accelerator.wait_for_everyone()  # no process ends while another still writes the report
            result.wall_time = time.time() - start
            return result
        except BaseException:
            # only a run that holds the lock may remove the directory it made: a run that made it but lost the
            # lock to another would delete the winner's files
            failed_early = self.created_dir and not self.trained and self.lock is not None
            raise
        finally:
            self._cleanup(remove=failed_early)

    def _train(self, start_step: int, counters: dict) -> RunResult:
        steps, result = self.spec.train.steps, RunResult(self.output_dir, start_step, counters=counters)
        bar = _progress(self.progress and self.main, steps, start_step)
        warned = timed_save = False  # the launcher's grace after a stop signal: found too short / checked
        try:
            with _StopFlag() as stop:
                for step in range(start_step + 1, steps + 1):
                    t0 = time.time()
                    self.stop_asked, self.stop_agreed = stop.signum is not None, None
                    metrics, reason = self.train_step(step)
                    self.trained = True
                    counters["consecutive_nonfinite"] = counters["consecutive_nonfinite"] + 1 \
                        if reason is Skip.NONFINITE else 0
                    if reason is not None:
                        counters[f"skipped_{reason.value}"] += 1
                    metrics.update({"step_time": time.time() - t0, **{k: v for k, v in counters.items()
                                                                      if k.startswith("skipped_")}})
                    if self.spec.eval.every and step % self.spec.eval.every == 0 and step != steps:
                        metrics.update(self.evaluate(step))
                    self._log({"step": step, **metrics})
                    bar.update(1)
                    bar.set_postfix(loss=metrics.get("loss", float("nan")), skipped=reason.value if reason else "-")
                    stopping = self.stop_agreed  # every process stops after the same step: agreed in _learn,
                    if stopping is None:  # or here when the step trained nothing
                        stopping = stop.signum is not None
                        if self.world > 1:
                            flag = torch.tensor([float(stopping)], device=self.accelerator.device)
                            stopping = bool(self.accelerator.reduce(flag, "sum").item() > 0)
                    too_many = counters["consecutive_nonfinite"] >= self.spec.safety.max_consecutive_nonfinite
                    every = self.spec.checkpoint.every
                    saving = time.time()
                    if too_many or stopping or (every and step % every == 0) or step == steps:
                        self._save(step, {"counters": counters, "objective": self.parts.objective.state_dict(),
                                          "spec": self.r.to_dict()})
                        if self.main and not warned and not timed_save:  # the first checkpoint shows how long
                            warned, timed_save = _grace_too_short(metrics["step_time"] + time.time() - saving), True
                    elif self.main and not warned and not timed_save and step == start_step + 1:
                        warned = _grace_too_short(2 * metrics["step_time"])  # until then: a checkpoint ~ a step
                    result.steps_done = step
                    if too_many:
                        raise RunError(
                            f"{counters['consecutive_nonfinite']} steps in a row had a non-finite reward, loss or "
                            f"gradient (step {step}); stopped. Weights were left untouched by those steps and a "
                            f"checkpoint was saved: lower the learning rate or check the rewards, then --resume "
                            f"(or raise safety.max_consecutive_nonfinite)")
                    if stopping:
                        result.interrupted = True
                        result.exit_code = 128 + (stop.signum or signal.SIGTERM)
                        return result
        finally:
            bar.close()
        return result

    def _write_final(self) -> None:
        import yaml

        final, tmp = self.output_dir / "final", self.output_dir / ".tmp-final"
        if not self.main and not self.fsdp:
            return
        # Sharded (FSDP2) weights are gathered inside save_pretrained: every process calls it, the others into
        # a scratch directory.
        target = tmp if self.main else Path(tempfile.mkdtemp(prefix="vpo-final-"))
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        with self.policy.trainable.gathered():
            self.policy.save_pretrained(target)
        if not self.main:
            shutil.rmtree(target, ignore_errors=True)
            return
        (tmp / "spec.yaml").write_text(yaml.safe_dump(self.r.to_dict(), sort_keys=False))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    def _cleanup(self, remove: bool) -> None:
        """Release the lock and the trackers; a run that failed before its first step removes the directory it
        made (a later failure keeps everything written)."""
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.trackers:
            acc.end_training()
        if remove and self.output_dir.is_dir():  # still under the lock: no other run can start in it meanwhile
            shutil.rmtree(self.output_dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # as torch asks; the process then ends with os._exit (cli._exit says why)


# ----------------------------------------------------------------------------------------------- helpers
def _grace_too_short(seconds: float) -> bool:
    """torchrun (and accelerate launch, through it) kills the processes a fixed time after passing a stop signal on
    to them: warn when finishing a step and saving a checkpoint (``seconds``) may take longer, as then the work
    since the last checkpoint would be lost."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not under torch's elastic launcher
        return False
    grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
    if seconds > grace:
        print(f"vpo: warning: after a stop signal (SIGTERM, Ctrl-C) the launcher kills these processes within "
              f"{grace:g} s, but finishing a step and saving a checkpoint takes about {seconds:.0f} s here; unless "
              f"torchrun was given a longer --shutdown-timeout, set TORCH_ELASTIC_SHUTDOWN_TIMEOUT="
              f"{math.ceil(2 * seconds)} in the launcher's environment so that a stopped run saves its work",
              file=sys.stderr)
    return seconds > grace


def _ddp(accelerator: Any, module: torch.nn.Module) -> torch.nn.Module:
    """accelerate's DDP wrapper around ``module``, without the autocast and float32 outputs that it patches into
    ``module.forward`` under mixed precision: with them, N processes would sample and compute in another precision
    than 1 (the loop autocasts the loss itself, for any number of processes)."""
    wrapped = accelerator.prepare_model(module)
    accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # restores module.forward
    return wrapped


@contextlib.contextmanager
def _no_sync(accelerator: Any, module: Any):
    """Backward passes inside accumulate gradients locally; the step's last backward synchronises them."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(module):
            yield


def _slices(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def _finite_or_none(value: torch.Tensor) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _gather_to_main(items: list) -> list:
    """Concatenate every process's list on the main process, in rank order (others get [])."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if out is not None else []


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, sort_keys=True)
    return out


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint (they are redone after a resume) and lines cut by SIGKILL."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) < step or (rec.get("step", 0) == step and not rec.get("final")):
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="vpo", unit="step", dynamic_ncols=True)
