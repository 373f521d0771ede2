"""Command line: ``vpo run|validate|plugins|schema|report|build-pairs`` and ``vpo-run SPEC``.

Exit codes: 0 done; 1 failure while running; 2 invalid spec or usage; 3 a needed plugin is missing or broken;
128+N when stopped by signal N after saving a checkpoint (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import SpecError, VpoError

EXIT_OK, EXIT_FAILURE, EXIT_SPEC, EXIT_PLUGIN = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; keep its short usage message
        self.print_usage(sys.stderr)
        self.exit(EXIT_SPEC, f"{self.prog}: error: {message}\n")


def _plugin_manager():
    from .plugins import PluginManager

    return PluginManager()


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="YAML spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=10 (repeatable)")


def cmd_run(args, pm) -> int:
    from .loop import Trainer
    from .spec import load_spec

    resolved = load_spec(args.spec, pm, args.overrides)
    trainer = Trainer(resolved, resume=args.resume, progress=not args.no_progress, output_dir=args.output_dir)
    try:
        result = trainer.run()
    except VpoError:
        raise
    except KeyboardInterrupt:
        print("vpo: interrupted; the last saved checkpoint is intact. Continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: short message, traceback to a file
        log = trainer.output_dir / "error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            where = f" (traceback in {log})"
        except OSError:
            where = ""
        print(f"vpo: run failed: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    if result.interrupted:
        return result.exit_code
    print(f"vpo: done: {result.steps_done} steps; outputs in {result.output_dir} "
          f"(report: {result.output_dir / 'report.html'})")
    for key, value in sorted(result.final_metrics.items()):
        if not key.endswith("_sem"):
            print(f"  {key} = {value:.4f} ± {result.final_metrics.get(key + '_sem', 0.0):.4f}")
    return EXIT_OK


def cmd_validate(args, pm) -> int:
    from .spec import load_spec

    resolved = load_spec(args.spec, pm, args.overrides)
    mode = getattr(resolved.objective.config, "requires", "pairs")
    if mode == "pairs":
        mode = "offline pairs" if resolved.spec.data.pairs else "online pairs"
    print(f"{args.spec}: valid ({mode}; policy {resolved.policy.component.name}, objective "
          f"{resolved.objective.component.name}, rewards: {', '.join(r.name for r in resolved.rewards) or 'none'})")
    return EXIT_OK


def cmd_plugins(args, pm) -> int:
    rows = []
    for info in sorted(pm.plugins.values(), key=lambda p: p.name):
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "parts": {k: v for k, v in info.parts.items() if v},
                     "commands": sorted(c.name for c in pm.commands.values() if c.plugin == info.name),
                     "error": info.error})
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

    print(json.dumps(json_schema(pm), indent=1))
    return EXIT_OK


def cmd_report(args, pm) -> int:
    from .report import write_report

    if not Path(args.output_dir, "metrics.jsonl").exists():
        raise SpecError(f"'{args.output_dir}' is not a vpo output directory (no metrics.jsonl)")
    print(write_report(Path(args.output_dir)))
    return EXIT_OK


def cmd_build_pairs(args, pm) -> int:
    from .offline import build_pair_dataset
    from .spec import load_spec

    resolved = load_spec(args.spec, pm, args.overrides)
    out = build_pair_dataset(resolved, Path(args.out), progress=not args.no_progress)
    print(f"vpo: pair dataset written to {out}")
    return EXIT_OK


def _plugin_command(cmd):
    def run(args, pm) -> int:
        args.plugin_manager = pm  # commands that load specs reuse the already loaded plugins
        return cmd.run(args)
    return run


def build_parser(pm) -> argparse.ArgumentParser:
    parser = _Parser(prog="vpo", description="Align text-to-video models with video preference feedback.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("run", help="train as the spec says (same as vpo-run SPEC)")
    _add_spec_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--output-dir", help="override output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a spec (and that its plugins are installed) without running")
    _add_spec_args(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("plugins", help="list installed plugins and the parts they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("schema", help="print the JSON Schema of the spec (with installed plugins' configs)")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("report", help="(re)write report.html of an output directory")
    p.add_argument("output_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("build-pairs", help="sample with the base policy, score, select and store pairs "
                                           "(resumable: rerun to continue)")
    _add_spec_args(p)
    p.add_argument("--out", required=True, help="pair dataset directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build_pairs)
    for cmd in sorted(pm.commands.values(), key=lambda c: c.name):
        if cmd.name in sub.choices:
            continue
        p = sub.add_parser(cmd.name, help=cmd.help or f"from plugin {cmd.plugin}")
        cmd.configure(p)
        p.set_defaults(func=_plugin_command(cmd))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        pm = _plugin_manager()
        parser = build_parser(pm)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_SPEC
        return int(args.func(args, pm) or 0)
    except VpoError as exc:
        print(f"vpo: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # argparse
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_SPEC


def run_main(argv: list[str] | None = None) -> int:
    """``vpo-run SPEC [--resume] ...`` == ``vpo run SPEC ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        return main(["run", "--help"])
    return main(["run", *argv])


def console_main() -> None:
    sys.exit(main())


def console_run_main() -> None:
    sys.exit(run_main())


if __name__ == "__main__":
    console_main()
