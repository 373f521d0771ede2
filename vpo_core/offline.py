"""``vpo build-pairs``: sample N candidates per prompt with the (base) policy, score, select pairs, store.

Resumable: each prompt's group is written atomically and skipped when the command is run again. Candidate
seeds depend only on (seed, prompt index, candidate), so a resumed build equals an uninterrupted one, and a build
launched on N processes (torchrun, accelerate launch), where process r builds the groups r, r + N, ..., equals a
1-process one.
"""

from __future__ import annotations

from pathlib import Path

from .assembly import build_parts, call, check_pairs, check_rows, make_accelerator
from .data import PairDatasetWriter, derive_seed
from .errors import SpecError
from .spec import ResolvedSpec


def build_pair_dataset(resolved: ResolvedSpec, out: Path, progress: bool = True) -> Path:
    import torch

    from .loop import _progress

    if resolved.selector is None:
        raise SpecError("building pairs needs a `selector:` section", "selector")
    if not resolved.rewards:
        raise SpecError("building pairs needs at least one reward", "rewards")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(resolved, out)
    parts = build_parts(resolved, accelerator, out)
    spec, n = resolved.spec, resolved.spec.train.candidates_per_prompt
    writer = PairDatasetWriter(out, {"candidates": n, "policy": resolved.policy.part_type.name,
                                     "selector": resolved.selector.part_type.name, "seed": spec.seed})
    prompts = parts.train_prompts
    mine = range(accelerator.process_index, len(prompts), accelerator.num_processes)  # this process's groups
    todo = [i for i in mine if not writer.has_group(i)]
    bar = _progress(progress and accelerator.is_main_process, len(mine), len(mine) - len(todo))
    parts.policy.train(False)
    try:
        for i in todo:
            seeds = [derive_seed(spec.seed, "pairs", i, j) for j in range(n)]
            with torch.no_grad():
                rollout = call(resolved.policy, "sample()", parts.policy.sample, [prompts[i]] * n, seeds)
                scores = parts.rewards.score(check_rows(resolved.policy, "sample() frames", rollout.frames, n),
                                             [prompts[i]] * n)
            pairs = call(resolved.selector, "select()", parts.selector.select,
                         {k: v.reshape(1, n) for k, v in scores.items()})
            writer.write_group(i, prompts[i], rollout.latents, seeds, scores, check_pairs(resolved.selector, pairs, 1, n))
            bar.update(1)
    finally:
        bar.close()
    accelerator.wait_for_everyone()  # every group is written before any process goes on to read the dataset
    return out
