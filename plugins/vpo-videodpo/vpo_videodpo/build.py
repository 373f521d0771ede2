"""``vpo videodpo build-pairs SPEC --out DIR``: VideoDPO's offline pair dataset.

1. Sample: ``vpo_core.offline.build_pair_dataset`` samples N candidates per prompt with the (base) policy,
   scores them with every reward and writes one group per prompt (latents, seeds, all scores). Skipped
   entirely when every prompt already has its group.
2. Finalise: OmniScores are computed from the stored scores and pairs are chosen over the *whole* dataset
   (best vs worst, optional mean split, keep the ``keep_top_fraction`` largest gaps, re-weighting); the
   chosen pair (or none) is written back into each group file with the candidates' OmniScores, and
   ``meta.json`` gets ``"videodpo": {"finalised": true, ...}`` last.

Both stages are resumable: groups are written atomically and skipped when present, and finalising is a
pure function of the stored scores, so running the command again after an interruption (or after deleting
groups) continues and ends with the same dataset.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from vpo_core import SpecError

from .omniscore import NormSpec, OmniScore
from .selector import OmniScoreSelectorConfig, select_pairs


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1) if path.name == "meta.json" else json.dumps(data))
    os.replace(tmp, path)


def _unmark(directory: Path) -> None:
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.pop("videodpo", None) is not None:
            _write_json(meta_path, meta)


def finalise_pair_dataset(directory: str | Path, config: OmniScoreSelectorConfig) -> dict:
    """Apply the dataset-level OmniScore pair selection to a built "vpo" pair dataset; returns a summary."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise SpecError(f"'{directory}' is not a vpo pair dataset (no meta.json)")
    _unmark(directory)  # first: an interrupted finalise is never taken as done
    meta = json.loads(meta_path.read_text())
    paths = sorted((directory / "groups").glob("[0-9]*.json"))
    if not paths:
        raise SpecError(f"pair dataset '{directory}' has no groups to finalise")
    groups = [json.loads(p.read_text()) for p in paths]
    scorer = OmniScore(config)
    omni = [scorer({k: torch.tensor(v, dtype=torch.float64) for k, v in g["scores"].items()}) for g in groups]
    counts: dict[str, int] = {}
    pairs = select_pairs(omni, config.keep_top_fraction, config.require_mean_split, config.min_gap,
                         config.alpha, config.weight_reference, config.max_weight, counts)
    chosen = {p.prompt_index: p for p in pairs}
    for i, (path, group) in enumerate(zip(paths, groups)):
        pair = chosen.get(i)
        group["omniscore"] = [float(x) for x in omni[i]]
        group["pairs"] = [] if pair is None else [
            {"winner": pair.winner, "loser": pair.loser, "weight": pair.weight, "margin": pair.margin}]
        _write_json(path, group)
    selector = config.model_dump(mode="json")
    for table in ("quality", "semantic"):  # record the ranges actually used (VBench defaults filled in)
        selector[table] = {key: dict(zip(("min", "max", "weight", "divide_by"), (spec or NormSpec()).resolved(key)))
                           for key, spec in getattr(config, table).items()}
    summary = {"finalised": True, "groups": len(groups), "pairs": len(pairs),
               "skipped_nonpositive_score": counts.get("nonpositive_score", 0), "selector": selector}
    meta["videodpo"] = summary
    _write_json(meta_path, meta)
    return summary


def build_videodpo_pairs(resolved, out: str | Path, progress: bool = True) -> dict | None:
    """Sample + score the missing groups (if any), then finalise. ``resolved``: a ``vpo_core.spec.ResolvedSpec``.
    Launched on several processes, they share the sampling and the main process alone finalises (the others
    return None)."""
    from vpo_core import build_pair_dataset, read_prompts

    selector = resolved.selector
    if selector is None or not isinstance(selector.config, OmniScoreSelectorConfig):
        raise SpecError("`vpo videodpo build-pairs` needs `selector: {type: omniscore, ...}` (it applies the "
                        "OmniScore gap filter across the dataset); for other selectors use `vpo build-pairs`",
                        "selector")
    out = Path(out)
    spec = resolved.spec
    prompts = read_prompts(spec.data.prompts, spec.data.prompts_file)
    if not prompts:
        raise SpecError("building pairs needs prompts: set `data.prompts` or `data.prompts_file`", "data")
    complete = all((out / "groups" / f"{i:06d}.json").exists() for i in range(len(prompts)))
    if not complete:  # only then is the policy loaded
        _unmark(out)  # groups are about to change: the dataset is not finalised until finalise ends
        build_pair_dataset(resolved, out, progress=progress)  # returns once every process's groups are written
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate launch: finalising is the main process's
        return None
    return finalise_pair_dataset(out, selector.config)


# ----------------------------------------------------------------------------------------------- CLI
def configure_cli(parser) -> None:
    sub = parser.add_subparsers(dest="videodpo_command", metavar="COMMAND")
    p = sub.add_parser("build-pairs", help="sample with the base policy, score, and store OmniScore pairs "
                                           "filtered over the whole dataset (resumable: rerun to continue)")
    p.add_argument("spec", help="YAML spec with a `selector: {type: omniscore}` section")
    p.add_argument("--out", required=True, help="pair dataset directory (then train with data.pairs: DIR)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value (repeatable)")
    p.add_argument("--no-progress", action="store_true")


def run_cli(args) -> int:
    from vpo_core import PluginManager, load_spec

    if getattr(args, "videodpo_command", None) != "build-pairs":
        print("usage: vpo videodpo build-pairs SPEC --out DIR [--set KEY=VALUE ...]", file=sys.stderr)
        return 2
    resolved = load_spec(args.spec, getattr(args, "plugin_manager", None) or PluginManager(), args.overrides)
    summary = build_videodpo_pairs(resolved, Path(args.out), progress=not args.no_progress)
    if summary is None:  # another process of the launch finalised and reports
        return 0
    skipped = summary["skipped_nonpositive_score"]
    note = f"; {skipped} pair(s) skipped: an OmniScore <= 0 has no re-weighting weight" if skipped else ""
    print(f"vpo: {summary['pairs']} pairs from {summary['groups']} prompts written to {args.out} "
          f"(train with data.pairs: {args.out}){note}")
    return 0
