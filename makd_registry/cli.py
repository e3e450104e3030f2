"""The ``makd`` command line.

Data goes to stdout (explain, aspects, plugins, schema); diagnostics and progress go to
stderr. Exit codes are :class:`makd_registry.errors.ExitCode` (listed by ``makd --help``):
each failure class is a typed error raised where the problem is found.
Plugins are loaded only when a command needs them, so ``makd --help`` always works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import ExitCode, MakdError, ObjectiveError, exit_code_summary

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def _out() -> Console:
    # piped output is data: never cut or wrap it to a guessed terminal width
    width = None if sys.stdout.isatty() else 1000
    return Console(highlight=False, soft_wrap=True, width=width)


def _print_failures(plugins: Any) -> None:
    for failure in plugins.failures:
        _err.print(f"warning: {failure.format()}", markup=False, style="yellow")


def _plugins(*, strict: bool = True) -> Any:
    """The command's plugin set: the plugins are loaded once per command."""
    from .plugins import load_plugins

    return load_plugins(strict=strict)


def _load(path: str, plugins: Any) -> Any:
    from .objective import load_objective

    return load_objective(path, plugins.registry, architectures=plugins.architectures)


def cmd_validate(args: argparse.Namespace) -> int:
    plugins = _plugins()
    _print_failures(plugins)
    status = ExitCode.OK
    for path in args.files:
        try:
            resolved = _load(path, plugins)
        except ObjectiveError as exc:
            for diag in exc.diagnostics:
                _err.print(diag.format(), markup=False)
            status = max(status, exc.exit_code)
            continue
        nodes = sum(1 for _ in resolved.root.walk())
        _err.print(f"{path}: ok ({nodes} objective nodes)", markup=False, style="green")
    return int(status)


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_dict, explain_tree

    plugins = _plugins()
    _print_failures(plugins)
    resolved = _load(args.file, plugins)
    if args.json:
        print(json.dumps(explain_dict(resolved), indent=2))
    elif args.resolved:
        print(json.dumps(resolved.dump(), indent=2))
    else:
        _out().print(explain_tree(resolved))
    return 0


def cmd_aspects(args: argparse.Namespace) -> int:
    plugins = _plugins(strict=False)
    _print_failures(plugins)
    registry = plugins.registry
    rows = [
        {
            "name": entry.name,
            "plugin": entry.plugin.name,
            "distribution": entry.plugin.distribution,
            "version": entry.plugin.version,
            "layerwise": entry.cls.layerwise() and not entry.cls.is_combinator,
            "combinator": entry.cls.is_combinator,
            "summary": entry.cls.summary(),
        }
        for entry in registry
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=None, box=None, pad_edge=False)
    for column in ("aspect", "plugin", "distribution", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        dist = row["distribution"] or "-"
        if row["version"]:
            dist += f" {row['version']}"
        table.add_row(row["name"], row["plugin"], dist, row["summary"])
    _out().print(table)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins_set = _plugins(strict=False)
    registry, architectures = plugins_set.registry, plugins_set.architectures
    by_plugin: dict[str, list[str]] = {}
    for entry in registry:
        by_plugin.setdefault(entry.plugin.name, []).append(entry.name)
    arch_by_plugin: dict[str, list[str]] = {}
    for model_type, (_, info) in sorted(architectures.by_type.items()):
        arch_by_plugin.setdefault(info.name, []).append(model_type)
    providers: dict[str, list[str]] = {}
    for kind, entry in sorted(registry.providers.items()):
        providers.setdefault(entry.plugin.name, []).append(kind)
    callbacks: dict[str, list[str]] = {}
    for name, entry in sorted(registry.callbacks.items()):
        callbacks.setdefault(entry.plugin.name, []).append(name)
    plugins = [
        {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "builtin": info.builtin,
            "module": info.module,
            "aspects": by_plugin.get(info.name, []),
            "architectures": arch_by_plugin.get(info.name, []),
            "providers": providers.get(info.name, []),
            "callbacks": callbacks.get(info.name, []),
        }
        for info in registry.plugins
    ]
    failures = [
        {"name": f.plugin, "distribution": f.distribution, "stage": f.stage, "error": f.error}
        for f in plugins_set.failures
    ]
    print(json.dumps({"plugins": plugins, "failures": failures}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.run import Run, RunOptions

    options = RunOptions(
        output=Path(args.output) if args.output else None,
        resume=args.resume,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        overrides=tuple(args.set or ()),
    )
    console = Console(
        stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 150
    )
    run = Run(args.file, options, console)
    summary = run.execute()
    if not run.world.main:
        return 0
    if args.dry_run:
        print(json.dumps(summary, indent=2))
        return 0
    _out().print(_run_table(summary))
    return 0


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.teacher_artifact import ArtifactBuild, BuildOptions

    options = BuildOptions(
        output=Path(args.output) if args.output else None,
        top_k=args.top_k,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        overrides=tuple(args.set or ()),
        overwrite=args.overwrite,
    )
    console = Console(
        stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 150
    )
    ArtifactBuild(args.file, options, console).execute()
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _run_table(summary: dict[str, Any]) -> Table:
    metrics = sorted(set(summary["student"]) | set(summary["teacher"]))
    table = Table(box=None, pad_edge=False, title=f"{summary['objective']}: validation")
    table.add_column("model")
    for metric in metrics:
        table.add_column(metric, justify="right")
    for name in ("teacher", "student"):
        if summary[name]:
            table.add_row(name, *(f"{summary[name].get(m, float('nan')):.4f}" for m in metrics))
    table.caption = (
        f"{summary.get('stopped_at', summary['steps'])} steps in "
        f"{summary['train_seconds']:.0f}s; student, metrics and "
        f"plots in {summary['run_dir']}"
    )
    return table


def cmd_student(args: argparse.Namespace) -> int:
    from .student_report import build_student_report

    plugins = _plugins()
    _print_failures(plugins)
    resolved = _load(args.file, plugins)
    report, models = build_student_report(resolved, plugins.architectures)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _out().print(_student_table(report))
    if args.output:
        from .models.serialization import save_student

        record = {"recipe": models.recipe, "objective": str(args.file)}
        save_student(models.student, args.output, tokenizer=models.tokenizer, record=record)
        _err.print(f"wrote the student to {args.output}", markup=False)
    return 0


def _student_table(report: dict[str, Any]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("model", "total", "non-embedding", "embedding", "layers"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in ("teacher", "student"):
        row = report.get(name)
        if row:
            p = row["parameters"]
            table.add_row(
                f"{name} ({row['class']})",
                f"{p['total']:,}",
                f"{p['non_embedding']:,}",
                f"{p['embedding']:,}",
                str(row["layers"]),
            )
    if report.get("student_to_teacher_non_embedding") is not None:
        table.caption = (
            f"student/teacher non-embedding parameters: "
            f"{report['student_to_teacher_non_embedding']:.1%}"
        )
        if report.get("factorization"):
            table.caption += "; " + report["factorization"]["summary"]
    return table


def cmd_export_dense(args: argparse.Namespace) -> int:
    from .models import make_architecture_registry
    from .models.serialization import export_dense

    target = export_dense(args.source, args.output, make_architecture_registry())
    _err.print(f"wrote a dense copy of {args.source} to {target}", markup=False)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .schema_export import objective_json_schema

    plugins = _plugins()
    _print_failures(plugins)
    text = json.dumps(objective_json_schema(plugins.registry), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        _err.print(f"wrote {args.output}", markup=False)
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="makd",
        description="Knowledge distillation for Transformer language models: compose loss "
        "aspects in a YAML objective file.",
        epilog=f"exit codes: {exit_code_summary()}. "
        "Set MAKD_DISABLE_PLUGIN_AUTOLOAD=1 to skip "
        "third-party plugins, MAKD_DISABLED_PLUGINS=a,b to skip some.",
    )
    parser.add_argument("--version", action="version", version=f"makd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "validate", help="check objective files; report every error with its location"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("explain", help="show the resolved objective tree, mappings and features")
    p.add_argument("file", metavar="FILE")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="the tree as JSON")
    group.add_argument(
        "--resolved", action="store_true", help="the validated file with all defaults, as JSON"
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("aspects", help="list the registered aspects")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_aspects)

    p = sub.add_parser("plugins", help="installed plugins and what they register (JSON)")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser(
        "run", help="distil: train the objective's student and evaluate it against the teacher"
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="DIR", help="run directory (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve everything and print the plan (parameters, features, memory) as JSON",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting of the file, e.g. --set training.steps=200 (repeatable)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("teacher", help="the teacher on its own: 'makd teacher cache'")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "cache",
        help="run the objective's teacher once over the training data and write what the "
        "objective needs from it (an artifact that 'teacher: {cache: DIR}' trains from)",
        description="Run the objective's teacher once over its tokenised training rows and "
        "write the features the objective needs (top-k logits with --top-k), sharded "
        "safetensors and a manifest of hashes. A killed build resumes when run again.",
    )
    p.add_argument("file", metavar="OBJECTIVE")
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="the artifact directory (default: the file's teacher.cache)",
    )
    p.add_argument(
        "--top-k",
        type=_positive,
        metavar="K",
        help="language models: keep the K largest logits per token and the rest of the mass "
        "(default: every logit)",
    )
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument(
        "--shard-rows",
        type=_positive,
        default=1024,
        metavar="N",
        help="training rows per shard (default 1024)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive,
        metavar="B",
        help="rows per teacher forward (default: training.eval_batch_size or batch_size)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting of the file, as for makd run (repeatable)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace what DIR holds (another artifact)"
    )
    p.set_defaults(func=cmd_teacher_cache)

    p = sub.add_parser(
        "student",
        help="build the objective's student (layer selection, factorization) and report "
        "parameter counts; -o saves it",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--output", metavar="DIR", help="save the student to DIR")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_student)

    p = sub.add_parser(
        "export-dense",
        help="write a dense copy of a factorized student that plain transformers loads",
    )
    p.add_argument("source", metavar="STUDENT_DIR")
    p.add_argument("-o", "--output", metavar="DIR", required=True)
    p.set_defaults(func=cmd_export_dense)

    p = sub.add_parser("schema", help="JSON Schema of objective files, with installed plugins")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ObjectiveError as exc:
        for diag in exc.diagnostics:
            _err.print(diag.format(), markup=False)
        return int(exc.exit_code)
    except MakdError as exc:
        interrupted = exc.exit_code == ExitCode.INTERRUPTED
        if not (interrupted and os.environ.get("RANK", "0") != "0"):  # once, not per process
            _err.print(f"error: {exc}", markup=False, style="red")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        _err.print("interrupted", style="red")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return 0
    except Exception:
        _err.print("internal error (a bug in makd or a plugin); please report it:", style="red")
        _err.print(traceback.format_exc(), markup=False)
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
