"""The daemon's settings, resolved once: flag, then process environment, then
the `.env` file, then the agents file's `server:` section, then the default.

Every setting of `aiwfd serve` is declared once, in REGISTRY: its flags, its
variable, its default, the parser that checks its range, its help. `aiwfd
serve --help`, the reading of flags and variables, docs/deploy.md's table
and tests/http/test_docs.py all read it. A value out of range is a UsageError,
worded the same for a flag and a variable.

A reload re-reads the `.env` file (so a rotated key takes effect) but never
the flags or the listen address.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from dotenv import dotenv_values

from aiwfd.spec.config import DEFAULT_MAX_BODY, DEFAULT_SHUTDOWN_TIMEOUT, Config, parse_size
from aiwfd.errors import StartupError, UsageError

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
# The longest duration a flag accepts: a day is already far past any proxy's timeout.
MAX_SECONDS = 86400.0


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
    # The shared store of SPEC §8-§9; None: the embedded one. Read at start only.
    redis_url: str | None = None
    # The embedded store's directory (SQLite files of jobs and idempotency keys);
    # None: $STATE_DIRECTORY (systemd StateDirectory=), else ./.aiwfd (state_path).
    state_dir: str | None = None
    # The merged environment (process over .env) that providers and auth read.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # What the .env file held at start (see reread_env).
    env_file_values: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        raw = self.env.get("API_KEY", "")
        return tuple(k.strip().encode("utf-8") for k in raw.split(",") if k.strip())

    @property
    def state_path(self) -> Path:
        """The embedded store's directory: the setting, systemd's StateDirectory=, else ./.aiwfd."""
        # systemd may list several directories separated by ':'; the first is ours.
        chosen = self.state_dir or self.env.get("STATE_DIRECTORY", "").split(":")[0] or ".aiwfd"
        return Path(chosen)

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


# --------------------------------------------------------------------------- parsers
# Each turns the text of a flag or variable into its value, or raises
# ValueError; the Setting's `expected` says what it accepts.


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


def _seconds(high: float, *, zero: bool = False) -> tuple[Callable[[str], float], str]:
    """A duration, above 0 (from 0 with `zero`) and at most `high`: its parser and its wording."""
    def parse(text: str) -> float:
        value = float(text)
        if not (0 <= value if zero else 0 < value) or not value <= high:  # NaN fails every comparison
            raise ValueError(text)
        return value
    return parse, (f"seconds, from 0 to {high:g}" if zero else f"seconds, more than 0 and at most {high:g}")


def _one_of(*choices: str, fold: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.lower() if fold else text
        if value not in choices:
            raise ValueError(text)
        return value
    return parse


def _size(text: str) -> int:
    value = parse_size(text)
    if value is None:
        raise ValueError(text)
    return value


def _text(text: str) -> str:
    return text


def _redis_url(text: str) -> str:
    """The schemes redis-py's from_url takes; checked here so a typo is a usage error, not a traceback."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss", "unix") or not rest:
        raise ValueError(text)
    return text


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Setting:
    """One setting of `aiwfd serve`, declared once."""

    field: str                     # the Settings field it fills (and the argparse dest)
    flags: tuple[str, ...]         # () for a setting only a variable sets
    env: str | None                # its environment variable (also read from the .env file)
    default: Any                   # the value when nothing sets it (None: decided later, see shown_default)
    shown_default: str             # the default as --help and docs/deploy.md show it (markdown code spans)
    help: str
    parse: Callable[[str], Any] = _text
    expected: str | None = None    # what `parse` accepts, quoted by the usage error; None: any text
    metavar: str | None = None
    switch: bool = False           # a flag without a value (store_true)

    @property
    def flag(self) -> str:
        """The long flag, the name a usage error gives."""
        return self.flags[-1]

    def value(self, text: str, source: str) -> Any:
        """`text` parsed; out of range, a one-line usage error naming `source` and the range."""
        try:
            return self.parse(text)
        except ValueError:
            raise UsageError(f"invalid {source} {text!r}: expected {self.expected}") from None

    def help_text(self) -> str:
        shown = self.shown_default.replace("`", "")
        extra = [f"env {self.env}"] if self.env else []
        if shown:
            extra.append(f"default {shown}")
        if self.expected:
            extra.append(self.expected)
        return f"{self.help} ({'; '.join(extra)})" if extra else self.help


def _duration(field: str, flags: tuple[str, ...], env: str | None, default: float | None, shown: str, help: str,
              *, high: float = MAX_SECONDS, zero: bool = False) -> Setting:
    parse, expected = _seconds(high, zero=zero)
    return Setting(field, flags, env, default, shown, help, parse=parse, expected=expected, metavar="SECONDS")


FILE = Setting("file", ("-f", "--file"), None, "config.yaml", "`config.yaml`", "the agents file", metavar="FILE")

REGISTRY: tuple[Setting, ...] = (
    FILE,
    Setting("output_dir", ("-o", "--output"), None, None, "a temporary directory, removed at exit",
            "keep the compiled artifacts in DIR", metavar="DIR"),
    Setting("port", ("-p", "--port"), "PORT", DEFAULT_PORT, f"`{DEFAULT_PORT}`",
            "the port to listen on; 0 takes any free port", parse=_port, expected="a whole number from 0 to 65535", metavar="PORT"),
    Setting("host", ("--host",), "HOST", DEFAULT_HOST, f"`{DEFAULT_HOST}`", "the address to bind", metavar="HOST"),
    Setting("env_file", ("--env-file",), None, None, "`./.env` if it exists", "read variables from FILE",
            metavar="FILE"),
    Setting("mock", ("--mock",), None, False, "off", "answer with schema-valid samples: no key, no network",
            switch=True),
    Setting("log_format", ("--log-format",), "AIWF_LOG_FORMAT", "text", "`text`", "the request log's format",
            parse=_one_of("text", "json"), expected="text or json", metavar="text|json"),
    Setting("log_level", ("--log-level",), "AIWF_LOG_LEVEL", "info", "`info`", "the least severe level logged",
            parse=_one_of("debug", "info", "warning", "error", fold=True),
            expected="debug, info, warning or error", metavar="LEVEL"),
    Setting("max_body", ("--max-body",), None, None, "`server.max_body`, else `1MiB`", "the largest request body",
            parse=_size, expected="a size such as 1048576 or 1MiB", metavar="SIZE"),
    _duration("body_timeout", ("--body-timeout",), None, DEFAULT_BODY_TIMEOUT, f"`{DEFAULT_BODY_TIMEOUT:g}`",
              "time allowed for the request body to arrive"),
    _duration("header_timeout", ("--header-timeout",), None,
              DEFAULT_HEADER_TIMEOUT, f"`{DEFAULT_HEADER_TIMEOUT:g}`",
              "time allowed for a request's headers to arrive; slower connections are closed"),
    _duration("keepalive_timeout", ("--keepalive-timeout",), None,
              DEFAULT_KEEPALIVE_TIMEOUT, f"`{DEFAULT_KEEPALIVE_TIMEOUT:g}`",
              "close a keep-alive connection idle this long; keep it above a proxy's own (nginx: 60)"),
    # 0 is allowed: no wait at all, what is in flight is answered 503 at once.
    _duration("shutdown_timeout", ("--shutdown-timeout",), None, None,
              f"`server.shutdown_timeout`, else `{DEFAULT_SHUTDOWN_TIMEOUT:g}`",
              "how long SIGTERM waits for in-flight requests", zero=True),
    _duration("deadline", ("--deadline",), None, DEFAULT_DEADLINE, f"`{DEFAULT_DEADLINE:g}`",
              "overall time allowed for one agent call, retries included"),
    _duration("sse_keepalive", (), "AIWF_SSE_KEEPALIVE", DEFAULT_SSE_KEEPALIVE, f"`{DEFAULT_SSE_KEEPALIVE:g}`",
              "seconds between `: keep-alive` comments of a stream", high=3600.0),
    Setting("redis_url", ("--redis-url",), "REDIS_URL", None, "unset: the embedded store",
            "the store the instances share (limits)", parse=_redis_url,
            expected="a redis://, rediss:// or unix:// URL", metavar="URL"),
    Setting("state_dir", ("--state-dir",), "AIWF_STATE_DIR", None, "`$STATE_DIRECTORY`, else `./.aiwfd`",
            "the embedded store's directory (instances on one host that share it share its data)",
            metavar="DIR"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `aiwfd serve`. Values stay text here: from_args parses them,
    with the same check and the same message as the variable's."""
    for s in REGISTRY:
        if not s.flags:
            continue
        if s.switch:
            p.add_argument(*s.flags, dest=s.field, action="store_true", help=s.help_text())
        else:
            p.add_argument(*s.flags, dest=s.field, default=None, metavar=s.metavar, help=s.help_text())


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, parsed and range-checked."""
    out: dict[str, Any] = {}
    for s in REGISTRY:
        text = getattr(args, s.field, None) if s.flags else None
        if s.switch:
            out[s.field] = bool(text)
        elif text is not None:
            out[s.field] = s.value(text, s.flag)
    return out


def from_args(args: argparse.Namespace, process_env: Mapping[str, str] | None = None) -> Settings:
    process_env = dict(os.environ if process_env is None else process_env)
    flags = flag_values(args)
    env_file = flags.get("env_file")
    if env_file is not None and not Path(env_file).is_file():
        raise StartupError(f"env file not found: {env_file}")
    if env_file is None and Path(".env").is_file():
        env_file = ".env"
    file_values = read_env_file(env_file)
    env = {**file_values, **process_env}

    values: dict[str, Any] = {}
    for s in REGISTRY:
        if s.field in flags:
            values[s.field] = flags[s.field]
        elif s.env and env.get(s.env):  # an empty value (PORT=) counts as unset
            values[s.field] = s.value(env[s.env], s.env)
        else:
            values[s.field] = s.default
    values["env_file"] = env_file
    return Settings(**values, env=env, env_file_values=file_values)
