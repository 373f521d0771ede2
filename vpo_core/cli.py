"""Command line: ``vpo run|validate|plugins|schema|report|build-pairs`` and ``vpo-run SPEC``.

Exit codes: 0 done; 1 failure while running; 2 invalid spec or usage; 3 a needed plugin is missing or broken;
128+N when stopped by signal N after saving a checkpoint (130 for Ctrl-C). A spec file is read (with the limits
of docs/spec.md) before any plugin or model code is imported, so a bad file fails fast and small.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

from .errors import PluginFault, SpecError, VpoError

EXIT_OK, EXIT_FAILURE, EXIT_SPEC, EXIT_PLUGIN = 0, 1, 2, 3


def _plugin_manager():
    from .plugins import PluginManager

    return PluginManager()


def _load(args, pm):
    from .spec import apply_overrides, read_spec_file, resolve

    source = read_spec_file(args.spec)
    apply_overrides(source, args.overrides)
    return resolve(source, pm())


def _add_spec_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("spec", nargs="+" if many else None, help="YAML spec file" + ("(s)" if many else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=10 (repeatable)")


def _rank() -> str | None:
    """This process's rank in a multi-process run, else None."""
    return os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def _who() -> str:
    """How messages start: "vpo", or "vpo [rank 1]" in a multi-process run (the launcher names the failed rank too)."""
    return "vpo" if _rank() is None else f"vpo [rank {_rank()}]"


def _say(message: str) -> None:
    """One line on stderr in one write: the processes of a run share the launcher's stderr, and unbuffered
    (torchrun runs ``python -u``) ``print`` writes a line and its end apart, so two ranks' lines could interleave."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def resume_command(args) -> str:
    """The command that continues this run, as it must be typed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    words = (["vpo-run"] if world == 1 else ["torchrun", "--nproc_per_node", str(world), "-m", "vpo_core.cli", "run"])
    words += [args.spec, "--resume", *(["--output-dir", args.output_dir] if args.output_dir else [])]
    for item in args.overrides:
        words += ["--set", item]
    return " ".join(shlex.quote(str(w)) for w in words) + ("" if world == 1 else " (or your launcher of choice)")


def _write_traceback(trainer, exc: BaseException) -> str:
    """``exc``'s traceback into the output directory's error.log (error-rank<N>.log, one per process), or into the
    temporary directory when the run removed its output directory (it failed before its first step) -> the text
    that points to it."""
    import tempfile

    name = "error.log" if _rank() is None else f"error-rank{_rank()}.log"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for log in (trainer.output_dir / name, Path(tempfile.gettempdir()) / f"vpo-{os.getpid()}-{name}"):
        try:
            if log.parent.is_dir():
                log.write_text(text)
                return f" (traceback in {log})"
        except OSError:  # e.g. the directory was removed meanwhile
            continue
    return ""


def cmd_run(args, pm) -> int:
    resolved = _load(args, pm)  # before importing torch: a bad spec fails fast and small
    from .loop import Trainer
    from .report import terminal_summary

    trainer = Trainer(resolved, resume=args.resume, progress=not args.no_progress, output_dir=args.output_dir,
                      allow_spec_change=args.allow_spec_change)
    try:
        result = trainer.run()
    except VpoError as exc:
        # a plugin that raised: its traceback, for its author
        where = _write_traceback(trainer, exc.__cause__) \
            if isinstance(exc, PluginFault) and exc.__cause__ is not None else ""
        if getattr(trainer, "trained", False):
            where += f"\n  (what the run wrote is kept; continue with: {resume_command(args)})"
        if where:
            exc.args = (f"{exc}{where}",)
        raise
    except KeyboardInterrupt:
        from .checkpoint import list_checkpoints

        saved = list_checkpoints(trainer.output_dir)
        _say(f"{_who()}: interrupted; " + (f"checkpoint {saved[-1].name} is intact. Continue with: "
             f"{resume_command(args)}" if saved else "no checkpoint had been saved yet"))
        return 130
    except Exception as exc:  # an unexpected failure: one line, the traceback in a file
        _say(f"{_who()}: run failed: {type(exc).__name__}: {exc}{_write_traceback(trainer, exc)}")
        return EXIT_FAILURE
    if not getattr(trainer, "main", True):
        return result.exit_code
    if result.interrupted:
        print(f"vpo: stopped after step {result.steps_done}; checkpoint saved. Continue with: "
              f"{resume_command(args)}", file=sys.stderr)
        return result.exit_code
    print(terminal_summary(result))
    return EXIT_OK


def cmd_validate(args, pm) -> int:
    """One line per file; the exit status is the worst of them."""
    worst = EXIT_OK
    for path in args.spec:
        try:
            from .spec import apply_overrides, read_spec_file, resolve

            source = read_spec_file(path)
            apply_overrides(source, args.overrides)
            r = resolve(source, pm())
            data = _check_data(r) if args.data else ""
            print(f"{path}: valid ({r.mode}; policy {r.policy.part_type.name}, objective "
                  f"{r.objective.part_type.name}, rewards: {', '.join(x.name for x in r.rewards) or 'none'}){data}")
        except VpoError as exc:  # the file's line, then its problems indented under it
            print(f"{path}: {str(exc).replace(chr(10), chr(10) + '  ')}", file=sys.stderr)
            worst = max(worst, exc.exit_code)
    return worst


def _check_data(r) -> str:
    """``--data``: read the prompt files and a vpo pair dataset as a run would, before it starts."""
    from .data import PairDataset, read_prompts

    d = r.spec.data
    counts = [f"{len(read_prompts(d.prompts, d.prompts_file))} training prompts",
              f"{len(read_prompts(d.eval_prompts, d.eval_prompts_file, 'data.eval_prompts_file'))} held-out"]
    if d.pairs and d.pairs_format == "vpo":
        counts.append(f"{len(PairDataset(d.pairs))} pairs")
    elif d.pairs:
        counts.append(f"pairs in the '{d.pairs_format}' layout are checked by the objective when a run opens them")
    return "; data: " + ", ".join(counts)


def cmd_plugins(args, pm) -> int:
    pm = pm()
    rows = [{"name": info.name, "distribution": info.distribution, "version": info.version,
             "parts": {k: v for k, v in info.parts.items() if v},
             "commands": sorted(c.name for c in pm.commands.values() if c.plugin == info.name), "error": info.error}
            for info in sorted(pm.plugins.values(), key=lambda p: p.name)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    if not rows:
        print("no vpo plugins installed (pip install vpo-cogvideox vpo-onlinevpo ...; see registry.yaml)")
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else ""
        if row["error"]:
            print(f"{row['name']:<14} {dist:<26} BROKEN: {row['error']}")
            continue
        parts = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["parts"].items())
        cmds = f"; commands: {', '.join(row['commands'])}" if row["commands"] else ""
        print(f"{row['name']:<14} {dist:<26} {parts}{cmds}")
    return EXIT_OK


def cmd_schema(args, pm) -> int:
    from .spec import json_schema

    print(json.dumps(json_schema(pm()), indent=1))
    return EXIT_OK


def cmd_report(args, pm) -> int:
    from .report import write_report

    if not Path(args.output_dir, "metrics.jsonl").exists():
        raise SpecError(f"'{args.output_dir}' is not a vpo output directory (no metrics.jsonl)")
    print(write_report(Path(args.output_dir)))
    return EXIT_OK


def cmd_build_pairs(args, pm) -> int:
    from .offline import build_pair_dataset

    out = build_pair_dataset(_load(args, pm), Path(args.out), progress=not args.no_progress)
    if _rank() in (None, "0"):
        print(f"vpo: pair dataset written to {out}")
    return EXIT_OK


def _versions() -> str:
    from . import __version__

    lines = [f"vpo-core {__version__}"]
    pm = _plugin_manager()
    for info in sorted(pm.plugins.values(), key=lambda p: p.name):
        lines.append(f"  {info.distribution or info.name} {info.version or ''}{' (BROKEN)' if info.error else ''}")
    return "\n".join(lines)


def build_parser(commands=()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpo", description="Align text-to-video models with video preference "
                                                             "feedback.")
    parser.add_argument("--version", action="store_true", help="print the core's and each plugin's version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="train as the spec says (same as vpo-run SPEC)")
    _add_spec_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest intact checkpoint in output_dir")
    p.add_argument("--allow-spec-change", action="store_true",
                   help="with --resume: apply spec changes beyond steps/cadence/logging (recorded in spec_changes.jsonl)")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check spec files (and that their plugins are installed) without running")
    _add_spec_args(p, many=True)
    p.add_argument("--data", action="store_true", help="also read the prompt files and a vpo pair dataset")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plugins", help="list installed plugins and the parts they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    sub.add_parser("schema", help="print the JSON Schema of the spec (with installed plugins' configs)"
                   ).set_defaults(func=cmd_schema)
    p = sub.add_parser("report", help="(re)write report.html of an output directory")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("build-pairs", help="sample with the base policy, score, select and store pairs (resumable)")
    _add_spec_args(p)
    p.add_argument("--out", required=True, help="pair dataset directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_pairs)
    for cmd in commands:
        if cmd.name not in sub.choices:
            p = sub.add_parser(cmd.name, help=cmd.help or f"from plugin {cmd.plugin}")
            cmd.configure(p)
            p.set_defaults(func=_plugin_command(cmd))
    return parser


def _plugin_command(cmd):
    def run(args, pm) -> int:
        args.plugin_manager = pm()  # commands that load specs reuse the already loaded plugins
        return cmd.run(args)
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        pm = functools.lru_cache(maxsize=None)(_plugin_manager)  # plugins load once, and only when needed
        builtin = {"run", "validate", "plugins", "schema", "report", "build-pairs"}
        first = next((a for a in argv if not a.startswith("-")), None)
        plugin_command = first is not None and first not in builtin  # plugins are needed to parse it
        parser = build_parser(sorted(pm().commands.values(), key=lambda c: c.name) if plugin_command else ())
        args = parser.parse_args(argv)
        if args.version:
            print(_versions())
            return EXIT_OK
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_SPEC
        return int(args.func(args, pm) or 0)
    except VpoError as exc:
        _say(f"{_who()}: {exc}")
        return exc.exit_code
    except SystemExit as exc:  # argparse: usage errors exit 2 with their message
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_SPEC


def run_main(argv: list[str] | None = None) -> int:
    """``vpo-run SPEC [--resume] ...`` == ``vpo run SPEC ...``."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["run", "--help"] if argv[:1] in (["-h"], ["--help"]) else ["run", *argv])


def _exit(code: int) -> None:
    """End the process. A process of a multi-process launch ends with ``os._exit``: torch's C++ teardown of the
    gloo transport at interpreter exit sometimes aborts ("terminate called without an active exception",
    SIGABRT, about 1 launch in 30 here), and the launcher then reports a finished run as failed. Every file is
    closed and the trackers ended by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def console_main() -> None:
    _exit(main())


def console_run_main() -> None:
    _exit(run_main())


if __name__ == "__main__":
    console_main()
