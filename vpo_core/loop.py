"""The one training loop, on accelerate.

Modes (picked from the objective's ``requires`` and the spec's data):
* online pairs  : the current policy samples N candidates per prompt -> rewards -> selector -> objective
* offline pairs : batches come from a stored pair dataset (``data.pairs``)
* rollout       : the objective samples with gradient and back-propagates a differentiable reward

Determinism: every random choice of step ``s`` (prompts, candidate seeds, timesteps, noise, dropout) derives
from ``(seed, s)``; with the checkpointed weights, optimizer and scheduler this makes a resumed run end with
the same weights as an uninterrupted one. RNG states are checkpointed as well.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import checkpoint as ckpt
from .data import PairDataset, derive_seed, ordered_indices, pairs_to_batch, read_prompts
from .errors import RunError, SpecError, VpoError
from .spec import ResolvedSpec
from .types import BuildContext, PromptBatch, StepContext
from .video import write_video

METRICS = "metrics.jsonl"
EVALS = "eval.jsonl"


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    interrupted: bool = False
    exit_code: int = 0
    final_metrics: dict[str, float] = field(default_factory=dict)


def build_lr_lambda(kind: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if kind != "constant" and warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if kind == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return fn


class _StopFlag:
    """SIGINT/SIGTERM: finish the current step, checkpoint, exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: the user insists
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nvpo: received {signal.Signals(signum).name}; finishing this step, then saving a checkpoint",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    def __init__(self, resolved: ResolvedSpec, *, resume: bool = False, progress: bool = True,
                 output_dir: str | Path | None = None) -> None:
        self.r = resolved
        self.spec = resolved.spec
        self.output_dir = Path(output_dir or self.spec.output_dir)
        self.resume = resume
        self.progress = progress

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare_output_dir(self) -> Path | None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise SpecError(f"output_dir '{out}' exists and is not a directory", "output_dir")
        latest = None
        if out.is_dir():
            ckpt.clean_partial(out)
            latest = ckpt.latest_checkpoint(out)
            has_work = latest is not None or (out / METRICS).exists() or (out / "final").exists()
            if has_work and not self.resume:
                raise SpecError(
                    f"output_dir '{out}' already holds a run; continue it with --resume, or choose another "
                    f"output_dir (nothing was changed)", "output_dir")
        out.mkdir(parents=True, exist_ok=True)
        return latest

    def _build_parts(self) -> None:
        """Accelerator and the four parts (shared by training and ``vpo build-pairs``)."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        spec = self.spec
        trackers = spec.logging.trackers
        if trackers == "auto":
            trackers = ["tensorboard"] if _importable("tensorboard") else []
        for t in trackers:
            if not _importable(t if t != "tensorboard" else "tensorboard"):
                raise SpecError(f"tracker '{t}' is not installed: pip install {t}", "logging.trackers")
        cpu_only = not torch.cuda.is_available()
        if spec.train.mixed_precision == "fp16" and cpu_only:
            raise SpecError("mixed_precision fp16 needs a GPU; use 'bf16' or 'no' on CPU", "train.mixed_precision")
        self.trackers = trackers
        _reset_single_process_accelerate_state()
        self.accelerator = Accelerator(mixed_precision=spec.train.mixed_precision, log_with=trackers or None,
                                       project_dir=str(self.output_dir))
        set_seed(spec.seed)
        ctx = BuildContext(device=self.accelerator.device, seed=spec.seed, output_dir=self.output_dir,
                           mixed_precision=spec.train.mixed_precision, allow_pickle=spec.safety.allow_pickle,
                           trust_remote_code=spec.safety.trust_remote_code)
        self.policy = _build_part(self.r.policy, ctx)
        self.rewards = [(r.name, r.weight, _build_part(r, ctx)) for r in self.r.rewards]
        self.selector = _build_part(self.r.selector, ctx) if self.r.selector is not None else None
        self.objective = _build_part(self.r.objective, ctx)
        self.requires = getattr(self.r.objective.config, "requires", getattr(self.objective, "requires", "pairs"))
        if self.requires == "rollout":
            for i, (name, _, reward) in enumerate(self.rewards):
                if not getattr(reward, "differentiable", False):
                    raise SpecError(f"reward '{name}' is not differentiable, but objective "
                                    f"'{self.r.objective.component.name}' back-propagates through rewards; "
                                    f"remove it or use a pair-based objective", f"rewards[{i}]")
        self._check_score_keys()
        self.train_prompts = read_prompts(spec.data.prompts, spec.data.prompts_file)
        self.eval_prompts = read_prompts(spec.data.eval_prompts, spec.data.eval_prompts_file)
        if spec.eval.max_prompts:
            self.eval_prompts = self.eval_prompts[: spec.eval.max_prompts]

    def _build(self) -> None:
        self._build_parts()
        spec = self.spec
        self.pair_data = None
        if self.requires == "pairs" and spec.data.pairs:
            opener = getattr(self.objective, "open_pair_dataset", None)
            if opener is not None:
                self.pair_data = opener(spec.data.pairs, spec.data.pairs_format, self.policy)
            elif spec.data.pairs_format != "vpo":
                raise SpecError(f"pairs_format '{spec.data.pairs_format}' is not understood by objective "
                                f"'{self.r.objective.component.name}'; use 'vpo'", "data.pairs_format")
            else:
                self.pair_data = PairDataset(spec.data.pairs)
        elif self.requires == "pairs" and self.selector is None:
            raise SpecError("online pairs need a `selector:` section", "selector")

        self.policy.train(True)  # sampling switches to eval mode and back; losses run in train mode
        self.params = [p for p in self.policy.trainable_parameters() if p.requires_grad]
        if not self.params:
            raise SpecError("the policy has no trainable parameters; check its LoRA / fine-tuning settings", "policy")
        t = spec.train
        optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, betas=tuple(t.adam_betas),
                                      eps=t.adam_epsilon, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, build_lr_lambda(t.lr_scheduler, t.warmup_steps, t.steps))
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        if self.trackers:
            self.accelerator.init_trackers(spec.logging.project, config=_flat(self.r.to_dict()),
                                           init_kwargs=_tracker_kwargs(self.trackers, spec.logging.run_name))

    def _check_score_keys(self) -> None:
        """Parts that expose ``score_keys`` name keys that some reward must provide: fail before sampling."""
        available = {"total"} | {f"{name}.{dim}" for name, _, r in self.rewards for dim in getattr(r, "dimensions", ())}
        for section, part in (("selector", self.selector), ("objective", self.objective)):
            missing = [k for k in getattr(part, "score_keys", ()) or () if k not in available]
            if missing:
                raise SpecError(f"score key(s) {missing} are not provided by any reward; available keys: "
                                f"{sorted(available)} ('<reward name>.<dimension>' or 'total')", section)

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """All rewards -> {"<name>.<dim>": [B]} plus "total" = sum_r weight_r * mean over r's dims."""
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, weight, reward in self.rewards:
            dims = reward.score(frames, prompts)
            if not dims:
                raise RunError(f"reward '{name}' returned no scores")
            for dim, value in dims.items():
                out[f"{name}.{dim}"] = value.float().reshape(-1).to(frames.device)
            mean = torch.stack([v.float().reshape(-1) for v in dims.values()]).mean(0).to(frames.device)
            total = weight * mean if total is None else total + weight * mean
        if total is not None:
            out["total"] = total
        return out

    # ------------------------------------------------------------------------------------------ steps
    def _micro_index(self, step: int, micro: int) -> int:
        return (step - 1) * self.spec.train.gradient_accumulation_steps + micro

    def _shard(self, count: int, start: int) -> tuple[int, int]:
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return start * world + rank * count, count

    def _online_batch(self, step: int, micro: int, gen: torch.Generator, metrics: dict) -> Any:
        t = self.spec.train
        p, n = t.prompts_per_step, t.candidates_per_prompt
        start, count = self._shard(p, self._micro_index(step, micro) * p)
        idx = ordered_indices(len(self.train_prompts), self.spec.seed, start, count)
        prompts = [self.train_prompts[i] for i in idx]
        rows = [pr for pr in prompts for _ in range(n)]
        seeds = [derive_seed(self.spec.seed, "sample", step, micro, self.accelerator.process_index, i)
                 for i in range(len(rows))]
        self.policy.train(False)
        with torch.no_grad():
            rollout = self.policy.sample(rows, seeds, decode=True)
            scores = self.score(rollout.frames, rows)
        self.policy.train(True)
        for key, value in scores.items():
            metrics[f"reward/{key}"] = value.mean().item()
        if not all(torch.isfinite(v).all() for v in scores.values()):
            return "nonfinite"
        grid = {k: v.reshape(p, n) for k, v in scores.items()}
        pairs = self.selector.select(grid)
        metrics["pairs"] = metrics.get("pairs", 0) + len(pairs)
        if not pairs:
            return None
        return pairs_to_batch(pairs, rollout.latents, prompts, n)

    def _offline_batch(self, step: int, micro: int) -> Any:
        b = self.spec.train.pairs_per_step
        start, count = self._shard(b, self._micro_index(step, micro) * b)
        return self.pair_data.batch(ordered_indices(len(self.pair_data), self.spec.seed, start, count))

    def _rollout_batch(self, step: int, micro: int) -> PromptBatch:
        p = self.spec.train.prompts_per_step
        start, count = self._shard(p, self._micro_index(step, micro) * p)
        idx = ordered_indices(len(self.train_prompts), self.spec.seed, start, count)
        seeds = [derive_seed(self.spec.seed, "rollout", step, micro, self.accelerator.process_index, i)
                 for i in range(count)]
        return PromptBatch([self.train_prompts[i] for i in idx], seeds)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (all its micro-steps). Non-finite rewards/losses/gradients skip the update."""
        t = self.spec.train
        metrics: dict[str, float] = {"lr": self.scheduler.get_last_lr()[0]}  # the rate this step uses
        torch.manual_seed(derive_seed(self.spec.seed, "torch", step))  # dropout etc. independent of history
        self.optimizer.zero_grad(set_to_none=True)
        status = "ok"
        losses = []
        for micro in range(t.gradient_accumulation_steps):
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.spec.seed, "step", step, micro))
            if self.requires == "rollout":
                batch = self._rollout_batch(step, micro)
            elif self.pair_data is not None:
                batch = self._offline_batch(step, micro)
            else:
                batch = self._online_batch(step, micro, gen, metrics)
            if batch == "nonfinite":
                status = "nonfinite"
                break
            if batch is None:
                continue
            ctx = StepContext(step=step, generator=gen, score=self.score,
                              reward_weights={name: w for name, w, _ in self.rewards})
            for chunk in self._chunks(batch):
                with self.accelerator.autocast():
                    out = self.objective.loss(self.policy, chunk, ctx)
                share = _batch_size(chunk) / _batch_size(batch) / t.gradient_accumulation_steps
                if not torch.isfinite(out.loss).all() or any(
                        not torch.isfinite(v).all() for v in out.scores.values()):
                    status = "nonfinite"
                    break
                self.accelerator.backward(out.loss * share)
                losses.append(out.loss.item() * share * t.gradient_accumulation_steps)
                for k, v in out.metrics.items():
                    metrics[f"objective/{k}"] = v
                for k, v in out.scores.items():
                    metrics[f"reward/{k}"] = v.float().mean().item()
            if status != "ok":
                break
        if status == "ok" and not losses:
            status = "no_pairs"
        if status == "ok":
            self._sync_gradients()
            grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in self.params)
            if not grads_finite:
                status = "nonfinite"
        if status == "ok":
            if t.max_grad_norm:
                norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
                metrics["grad_norm"] = float(norm)
            self.optimizer.step()
            self.scheduler.step()
            metrics["loss"] = sum(losses) / t.gradient_accumulation_steps
            metrics.update({f"objective/{k}": v for k, v in
                            (_call_opt(self.objective, "after_optimizer_step", step, self.policy) or {}).items()})
        self.optimizer.zero_grad(set_to_none=True)
        metrics["status"] = status
        return metrics

    def _chunks(self, batch: Any) -> Iterator[Any]:
        size = self.spec.train.pair_batch_size
        n = _batch_size(batch)
        if size is None or n <= size or not hasattr(batch, "winner_latents"):
            yield batch
            return
        from .types import PairBatch

        for s in range(0, n, size):
            sl = slice(s, s + size)
            yield PairBatch(batch.winner_latents[sl], batch.loser_latents[sl], batch.prompts[sl],
                            batch.weights[sl], None if batch.margins is None else batch.margins[sl])

    def _sync_gradients(self) -> None:
        if self.accelerator.num_processes > 1:  # no DDP wrapper: policies are composites, so reduce by hand
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        if not self.eval_prompts or not self.rewards:
            return {}
        e = self.spec.eval
        rows = [pr for pr in self.eval_prompts for _ in range(e.seeds_per_prompt)]
        seeds = [derive_seed(self.spec.seed, "eval", i) for i in range(len(rows))]  # same every evaluation
        self.policy.train(False)
        with torch.no_grad():
            rollout = self.policy.sample(rows, seeds, decode=True)
            scores = self.score(rollout.frames, rows)
        self.policy.train(True)
        record = {"step": step, "final": final, "prompts": rows, "seeds": seeds,
                  "scores": {k: [float(x) for x in v.cpu()] for k, v in scores.items()}}
        with open(self.output_dir / EVALS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.accelerator.is_main_process:
            ext = e.video_format
            for i in range(min(e.videos, len(self.eval_prompts))):
                path = self.output_dir / "samples" / ckpt.step_dir_name(step) / f"prompt-{i:02d}.{ext}"
                write_video(path, rollout.frames[i * e.seeds_per_prompt], e.fps, e.video_scale)
        out = {}
        for k, v in scores.items():
            v = v.float().cpu()
            out[f"eval/{k}"] = v.mean().item()
            out[f"eval/{k}_sem"] = (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else 0.0
        return out

    # ------------------------------------------------------------------------------------------ run
    def _save(self, step: int, state: dict) -> Path:
        return ckpt.save_checkpoint(
            self.output_dir, step, policy_state=self.policy.state_dict_for_checkpoint(),
            optimizer_state=self.optimizer.state_dict(), scheduler_state=self.scheduler.state_dict(),
            trainer_state=state, keep_last=self.spec.checkpoint.keep_last)

    def _restore(self, path: Path) -> dict:
        data = ckpt.load_checkpoint(path)
        self.policy.load_state_dict_from_checkpoint(data["policy"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        ckpt.set_rng_state(data["state"]["rng"], data["rng_tensors"])
        load = getattr(self.objective, "load_state_dict", None)
        if load is not None and "objective" in data["state"]:
            load(data["state"]["objective"])
        return data["state"]

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=record["step"])

    def run(self) -> RunResult:
        latest = self._prepare_output_dir()
        self._build()
        start_step = 0
        counters = {"skipped_nonfinite": 0, "skipped_no_pairs": 0, "consecutive_nonfinite": 0}
        if latest is not None:
            state = self._restore(latest)
            start_step = state["step"]
            counters.update(state.get("counters", {}))
            _truncate_jsonl(self.output_dir / METRICS, start_step)
            _truncate_jsonl(self.output_dir / EVALS, start_step, keep_equal=True)
            print(f"vpo: resumed from {latest} (step {start_step})", file=sys.stderr)
        elif self.resume:
            print(f"vpo: --resume: no checkpoint in '{self.output_dir}', starting from step 0", file=sys.stderr)
        (self.output_dir / "spec.resolved.json").write_text(json.dumps(self.r.to_dict(), indent=1))

        steps = self.spec.train.steps
        if start_step == 0:
            self._log({"step": 0, **self.evaluate(0), "time": time.time()})
        result = RunResult(self.output_dir, start_step)
        bar = _progress(self.progress and self.accelerator.is_main_process, steps, start_step)
        step = start_step
        try:
            with _StopFlag() as stop:
                for step in range(start_step + 1, steps + 1):
                    t0 = time.time()
                    metrics = self.train_step(step)
                    status = metrics.pop("status")
                    if status == "nonfinite":
                        counters["skipped_nonfinite"] += 1
                        counters["consecutive_nonfinite"] += 1
                    else:
                        counters["consecutive_nonfinite"] = 0
                        if status == "no_pairs":
                            counters["skipped_no_pairs"] += 1
                    metrics.update({"step_time": time.time() - t0, "skipped": int(status != "ok"),
                                    "skipped_nonfinite": counters["skipped_nonfinite"],
                                    "skipped_no_pairs": counters["skipped_no_pairs"]})
                    if self.spec.eval.every and step % self.spec.eval.every == 0 and step != steps:
                        metrics.update(self.evaluate(step))
                    self._log({"step": step, **metrics})
                    bar.update(1)
                    bar.set_postfix(loss=metrics.get("loss", float("nan")), status=status)
                    state = {"counters": counters, "data_position": self._micro_index(step + 1, 0),
                             "objective": _call_opt(self.objective, "state_dict")}
                    too_many = counters["consecutive_nonfinite"] >= self.spec.safety.max_consecutive_nonfinite
                    every = self.spec.checkpoint.every
                    if too_many or stop.signum is not None or (every and step % every == 0) or step == steps:
                        self._save(step, state)
                    result.steps_done = step
                    if too_many:
                        raise RunError(
                            f"{counters['consecutive_nonfinite']} steps in a row had a non-finite reward, loss or "
                            f"gradient (step {step}); stopped. Weights were left untouched by those steps and a "
                            f"checkpoint was saved: lower the learning rate or check the rewards, then --resume "
                            f"(or raise safety.max_consecutive_nonfinite)")
                    if stop.signum is not None:
                        result.interrupted = True
                        result.exit_code = 128 + stop.signum
                        print(f"vpo: stopped at step {step}; checkpoint saved. Continue with --resume",
                              file=sys.stderr)
                        return result
        finally:
            bar.close()
            if self.accelerator.trackers:
                self.accelerator.end_training()
        result.final_metrics = self.evaluate(steps, final=True)
        if result.final_metrics:
            self._log({"step": steps, "final": 1, **result.final_metrics})
        self._write_final()
        if self.accelerator.is_main_process:
            from .report import write_report

            write_report(self.output_dir)
        return result

    def _write_final(self) -> None:
        import shutil

        import yaml

        final = self.output_dir / "final"
        tmp = self.output_dir / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.policy.save_pretrained(tmp)
        (tmp / "spec.yaml").write_text(yaml.safe_dump(self.r.to_dict(), sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


# ----------------------------------------------------------------------------------------------- helpers
def _build_part(part, ctx: BuildContext) -> Any:
    try:
        return part.component.factory(part.config, ctx)
    except VpoError:
        raise
    except Exception as exc:  # a plugin failed to build its part: name it
        raise RunError(f"{part.kind} '{part.component.name}' (plugin '{part.component.plugin}') failed to "
                       f"build: {type(exc).__name__}: {exc}") from exc


def _reset_single_process_accelerate_state() -> None:
    """accelerate keeps a process-wide singleton; a second run in one process (tests, benchmarks) may ask for
    another mixed precision. Multi-process launches keep their state untouched."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _call_opt(obj: Any, name: str, *args: Any) -> Any:
    fn = getattr(obj, name, None)
    return fn(*args) if fn is not None else None


def _batch_size(batch: Any) -> int:
    if hasattr(batch, "winner_latents"):
        return batch.winner_latents.shape[0]
    return len(batch.prompts)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _tracker_kwargs(trackers: list[str], run_name: str | None) -> dict:
    return {"wandb": {"name": run_name}} if run_name and "wandb" in trackers else {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = str(v)
    return out


def _truncate_jsonl(path: Path, step: int, keep_equal: bool = True) -> None:
    """Drop records of steps after the checkpoint: they are redone after a resume."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        if rec.get("step", 0) < step or (keep_equal and rec.get("step", 0) == step and not rec.get("final")):
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
