"""The daemon's settings, resolved once: flag, then process environment, then
the `.env` file, then the agents file's `server:` section, then the default.

A reload re-reads the `.env` file (so a rotated key takes effect) but never
the flags or the listen address.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping

from dotenv import dotenv_values

from aiwfd.spec.config import DEFAULT_MAX_BODY, DEFAULT_SHUTDOWN_TIMEOUT, Config, parse_size
from aiwfd.errors import StartupError

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BODY_TIMEOUT = 10.0
# The request head must be complete this long after a connection opens (or
# after the first byte of the next request on a kept-alive one).
DEFAULT_HEADER_TIMEOUT = 10.0
# Above nginx's 60 s upstream keepalive_timeout, so that nginx closes an idle
# pooled connection first and never sends a request into our close.
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
# nginx's default proxy_read_timeout is 60 s: finish (or fail) before it gives up.
DEFAULT_DEADLINE = 55.0
# Seconds between `: keep-alive` comments on a streamed answer (SPEC §7.4).
DEFAULT_SSE_KEEPALIVE = 15.0


@dataclass(frozen=True)
class Settings:
    file: str = "config.yaml"
    output_dir: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    env_file: str | None = None
    mock: bool = False
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    max_body: int | None = None
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    shutdown_timeout: float | None = None
    deadline: float = DEFAULT_DEADLINE
    # env AIWF_SSE_KEEPALIVE: seconds between keep-alive comments of /agent/{name}/stream.
    sse_keepalive: float = DEFAULT_SSE_KEEPALIVE
    # The merged environment (process over .env) that providers and auth read.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # What the .env file held at start (see reread_env).
    env_file_values: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        raw = self.env.get("API_KEY", "")
        return tuple(k.strip().encode("utf-8") for k in raw.split(",") if k.strip())

    def effective_max_body(self, config: Config) -> int:
        return self.max_body or config.server.max_body or DEFAULT_MAX_BODY

    def effective_shutdown_timeout(self, config: Config) -> float:
        if self.shutdown_timeout is not None:
            return self.shutdown_timeout
        if config.server.shutdown_timeout is not None:
            return config.server.shutdown_timeout
        return DEFAULT_SHUTDOWN_TIMEOUT

    def reread_env(self, process_env: Mapping[str, str]) -> "Settings":
        """The same settings with the `.env` file read again (SIGHUP).

        A variable that the process inherited with exactly the value the file
        had at start came from the file (systemd's `EnvironmentFile=` loads the
        same file into the environment), so the file's new value wins for it:
        otherwise a rotated key could never take effect without a restart.
        """
        at_start = self.env_file_values
        inherited = {k: v for k, v in process_env.items() if at_start.get(k) != v}
        return replace(self, env={**read_env_file(self.env_file), **inherited})


def read_env_file(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        values = dotenv_values(path, encoding="utf-8")
    except OSError as e:
        raise StartupError(f"cannot read env file {path}: {e.strerror or e}") from None
    return {k: v for k, v in values.items() if v is not None}


def from_args(args: argparse.Namespace, process_env: Mapping[str, str] | None = None) -> Settings:
    process_env = dict(os.environ if process_env is None else process_env)
    env_file = args.env_file
    if env_file is not None and not Path(env_file).is_file():
        raise StartupError(f"env file not found: {env_file}")
    if env_file is None and Path(".env").is_file():
        env_file = ".env"
    file_values = read_env_file(env_file)
    env = {**file_values, **process_env}

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return env.get(name) or None

    port_s = pick(args.port, "PORT") or str(DEFAULT_PORT)
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise StartupError(f"invalid port {port_s!r}: expected a number from 0 to 65535") from None
    log_format = pick(args.log_format, "AIWF_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise StartupError(f"invalid log format {log_format!r}: expected text or json")
    log_level = (pick(args.log_level, "AIWF_LOG_LEVEL") or "info").lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise StartupError(f"invalid log level {log_level!r}: expected debug, info, warning or error")
    keepalive_s = env.get("AIWF_SSE_KEEPALIVE") or str(DEFAULT_SSE_KEEPALIVE)
    try:
        sse_keepalive = float(keepalive_s)
        if not 0 < sse_keepalive <= 3600:
            raise ValueError
    except ValueError:
        raise StartupError(f"invalid AIWF_SSE_KEEPALIVE {keepalive_s!r}: expected seconds, "
                           "more than 0 and at most 3600") from None
    max_body = None
    if args.max_body is not None:
        max_body = parse_size(args.max_body)
        if max_body is None:
            raise StartupError(f"invalid --max-body {args.max_body!r}: expected a size such as 1048576 or 1MiB")
    return Settings(
        file=args.file,
        output_dir=args.output,
        host=pick(args.host, "HOST") or DEFAULT_HOST,
        port=port,
        env_file=env_file,
        mock=args.mock,
        log_format=log_format,  # type: ignore[arg-type]
        log_level=log_level,  # type: ignore[arg-type]
        max_body=max_body,
        body_timeout=args.body_timeout,
        header_timeout=args.header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        shutdown_timeout=args.shutdown_timeout,
        deadline=args.deadline,
        sse_keepalive=sse_keepalive,
        env=env,
        env_file_values=file_values,
    )


def seconds(text: str) -> float:
    """A duration flag: a finite number of seconds above 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds, more than 0 and at most 86400")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", default="config.yaml", help="agents file (default: config.yaml)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="keep the compiled artifacts in DIR (default: a temporary directory removed at exit)")
    p.add_argument("-p", "--port", type=str, default=None, help=f"port (env PORT, default {DEFAULT_PORT})")
    p.add_argument("--host", default=None, help=f"address to bind (env HOST, default {DEFAULT_HOST})")
    p.add_argument("--env-file", default=None, metavar="FILE", help="read variables from FILE (default: ./.env if present)")
    p.add_argument("--mock", action="store_true", help="answer with schema-valid samples: no key, no network")
    p.add_argument("--log-format", choices=("text", "json"), default=None, help="request log format (env AIWF_LOG_FORMAT)")
    p.add_argument("--log-level", default=None, help="debug, info, warning or error (env AIWF_LOG_LEVEL)")
    p.add_argument("--max-body", default=None, metavar="SIZE", help="largest request body (default 1MiB)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help=f"time allowed for the request body to arrive (default {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=seconds, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="time allowed for a request's headers to arrive; slower connections are "
                        f"closed (default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--keepalive-timeout", type=seconds, default=DEFAULT_KEEPALIVE_TIMEOUT, metavar="SECONDS",
                   help="close a keep-alive connection idle this long; keep it above a proxy's own "
                        f"(nginx: 60) (default {DEFAULT_KEEPALIVE_TIMEOUT:g})")
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"how long SIGTERM waits for in-flight requests (default {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, metavar="SECONDS",
                   help=f"overall time allowed for one agent call, retries included (default {DEFAULT_DEADLINE:g})")
