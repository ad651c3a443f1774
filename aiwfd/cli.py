"""The `aiwfd` command: argparse in, exit codes out.

Deep code raises `ConfigError` / `StartupError`; this is the one place that
turns them into lines on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from aiwfd import __version__
from aiwfd.spec.artifacts import write_artifacts
from aiwfd.spec.compiler import Compiled, load_and_compile
from aiwfd.errors import ConfigError, StartupError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiwfd", description="Serve typed AI agents from a YAML file as an HTTP API."
    )
    parser.add_argument("--version", action="version", version=f"aiwfd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    v = sub.add_parser("validate", help="load and compile the agents file; print a summary")
    v.add_argument("-f", "--file", default="config.yaml", help="agents file (default: config.yaml)")

    c = sub.add_parser("compile", help="write the compiled artifacts (schemas, response formats)")
    c.add_argument("-f", "--file", default="config.yaml", help="agents file (default: config.yaml)")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write")

    from aiwfd import serve_cli  # serving's flags live beside the code that reads them

    serve_cli.add_parser(sub)
    return parser

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate(args.file, sys.stdout)
        if args.command == "compile":
            compiled = load_and_compile(args.file)
            print_warnings(compiled, sys.stderr)
            from aiwfd.spec.openapi import build_openapi

            written = write_artifacts(compiled, args.output, {"openapi.json": build_openapi(compiled)})
            print(f"{args.file}: wrote {len(written)} files to {args.output}")
            return EXIT_OK
        from aiwfd import serve_cli

        return serve_cli.run(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        n = len(e.problems)
        if n > 1:  # one problem is one line (SPEC §4.1): no count to add
            print(f"{getattr(args, 'file', 'config')}: {n} errors", file=sys.stderr)
        return EXIT_ERROR
    except StartupError as e:
        print(f"aiwfd: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130

def validate(path: str, out: TextIO) -> int:
    compiled = load_and_compile(path)
    print(summary(compiled), file=out)
    print_warnings(compiled, sys.stderr)
    return EXIT_OK

def summary(compiled: Compiled) -> str:
    cfg = compiled.config
    n_agents, n_types = len(compiled.agents), len(cfg.types)
    lines = [f"{cfg.path}: OK, {n_agents} agent{'s' * (n_agents != 1)}, {n_types} type{'s' * (n_types != 1)}"]
    rows = []
    for name in sorted(compiled.agents):
        a = compiled.agents[name].assistant
        io = f"{a.input_type_name or 'object'} -> {a.output_type_name or 'text'}"
        rows.append((name, f"{a.use}/{a.model}", io))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(2)]
    shown = rows[:40]
    for r in shown:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    if len(rows) > len(shown):
        lines.append(f"  … and {len(rows) - len(shown)} more")
    if compiled.warnings:
        lines.append(f"{len(compiled.warnings)} warning{'s' * (len(compiled.warnings) != 1)} (on stderr)")
    return "\n".join(lines)

def print_warnings(compiled: Compiled, out: TextIO) -> None:
    for w in compiled.warnings:
        print(f"warning: {w}", file=out)
