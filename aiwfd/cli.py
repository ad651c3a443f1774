"""The `aiwfd` command: argparse in, exit codes out.

Deep code raises `ConfigError` / `StartupError` (and its kinds); this is the
one place that turns them into lines on stderr and an exit code (SPEC §5),
never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import NoReturn, Sequence, TextIO

from aiwfd import __version__, settings
from aiwfd.spec.artifacts import write_artifacts
from aiwfd.spec.compiler import Compiled, load_and_compile
from aiwfd.errors import ConfigError, RetryableStartupError, StartupError, UsageError

# SPEC §5's exit codes, all of them here.
EXIT_OK = 0            # a clean stop
EXIT_CONFIG = 1        # invalid config or environment: the units' RestartPreventExitStatus=1
EXIT_USAGE = 2         # a malformed command line, a flag or setting variable out of range
EXIT_RETRY = 3         # a start-up failure that may pass on retry (port in use, cannot write artifacts)
EXIT_INTERRUPTED = 130  # a second SIGINT (or Ctrl-C before the daemon took over SIGINT)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors exit with EXIT_USAGE, named here rather than by argparse's default."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aiwfd", description="Serve typed AI agents from a YAML file as an HTTP API.")
    parser.add_argument("--version", action="version", version=f"aiwfd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    file = settings.FILE

    v = sub.add_parser("validate", help="load and compile the agents file; print a summary")
    v.add_argument(*file.flags, default=file.default, metavar=file.metavar, help=file.help_text())

    c = sub.add_parser("compile", help="write the compiled artifacts (schemas, response formats)")
    c.add_argument(*file.flags, default=file.default, metavar=file.metavar, help=file.help_text())
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write")

    s = sub.add_parser("serve", help="serve every agent at POST /agent/{name}")
    settings.add_arguments(s)
    return parser


def exit_code(e: BaseException) -> int:
    """The exit code of a failure (SPEC §5): the one mapping from error kinds to codes."""
    if isinstance(e, UsageError):
        return EXIT_USAGE
    if isinstance(e, RetryableStartupError):
        return EXIT_RETRY
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_CONFIG  # ConfigError, StartupError: the same start fails the same way


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        serve(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        n = len(e.problems)
        if n > 1:  # one problem is one line (SPEC §4.1): no count to add
            print(f"{getattr(args, 'file', 'config')}: {n} errors", file=sys.stderr)
        return exit_code(e)
    except StartupError as e:
        print(f"aiwfd: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt as e:
        return exit_code(e)


def serve(args: argparse.Namespace) -> NoReturn:
    """`aiwfd serve`: raises before anything listens; once the daemon ran, ends the process."""
    # No cyclic collection until the server is up (Server.serve turns it back
    # on): importing the openai SDK builds ~650 pydantic models and compiling
    # the config ~10^5 containers, and the collections they trigger cost
    # ~0.15-0.2 s of start-up. What they allocate lives as long as the process.
    gc.disable()
    s = settings.from_args(args)  # a usage error is reported before the daemon's imports
    # Imported here: `aiwfd validate` should not pay for the daemon's imports.
    from aiwfd import logs
    from aiwfd.daemon import server

    logs.setup(s.log_format, s.log_level)
    stop = server.run(s)
    code = EXIT_INTERRUPTED if stop is server.Stop.INTERRUPTED else EXIT_OK
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # Leave without the interpreter's teardown. After a clean stop,
    # connections, clients and the ephemeral directory are already gone, and
    # freeing every module of the SDKs would take longer than the drain itself
    # on a busy machine, past the bound of --shutdown-timeout + 2 s. After a
    # second SIGINT the drain is still running: "exits at once" (SPEC §5)
    # means without waiting for it, nor for the loop's tasks and threads.
    os._exit(code)


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
