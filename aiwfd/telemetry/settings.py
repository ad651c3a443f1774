"""The OTEL_* variables aiwfd reads, with their standard OpenTelemetry meanings.

    settings = from_env(env)     # None: tracing is off; StartupError: a bad value, named

Read from aiwfd's environment (which includes the .env file), not only the
process's as the SDK would. A per-signal `OTEL_EXPORTER_OTLP_TRACES_*`
variable wins over its `OTEL_EXPORTER_OTLP_*` form.
"""

from __future__ import annotations

import platform
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import unquote, urlsplit

from aiwfd import __version__
from aiwfd.errors import StartupError
from aiwfd.telemetry.spans import Sampler

__all__ = ["ENDPOINT_VARS", "TraceSettings", "configured", "from_env", "redacted"]

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


@dataclass(frozen=True)
class TraceSettings:
    endpoint: str                        # the full URL of POST {…}/v1/traces
    sampler: Sampler
    resource: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0                # s, one POST (OTEL_EXPORTER_OTLP_TIMEOUT)
    gzip: bool = False                   # OTEL_EXPORTER_OTLP_COMPRESSION=gzip
    ssl: ssl.SSLContext | None = None    # a CA file or a client certificate was given
    schedule_delay: float = 5.0          # s (OTEL_BSP_SCHEDULE_DELAY)
    max_queue: int = 2048                # spans (OTEL_BSP_MAX_QUEUE_SIZE); beyond it they are dropped
    max_batch: int = 512                 # spans per POST (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
    export_timeout: float = 30.0         # s, one batch with its retries (OTEL_BSP_EXPORT_TIMEOUT)
    capture_content: bool = False        # OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true


def configured(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(v, "").strip() for v in ENDPOINT_VARS)


def from_env(env: Mapping[str, str]) -> TraceSettings | None:
    if not configured(env):
        return None

    def name(suffix: str) -> str:
        """The variable that sets `suffix`: the per-signal one when it is set (errors name it)."""
        traces = f"OTEL_EXPORTER_OTLP_TRACES_{suffix}"
        return traces if env.get(traces, "").strip() else f"OTEL_EXPORTER_OTLP_{suffix}"

    def var(suffix: str) -> str:
        return env.get(name(suffix), "").strip()

    protocol = var("PROTOCOL")
    if protocol and protocol != "http/protobuf":
        raise StartupError(f"{name('PROTOCOL')} {protocol!r} is not supported: aiwfd exports "
                           "OTLP over HTTP as protobuf (http/protobuf), to port 4318 of a collector")
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not traces:
        traces = env["OTEL_EXPORTER_OTLP_ENDPOINT"].strip().rstrip("/") + "/v1/traces"
    if not traces.startswith(("http://", "https://")) or not _hostname(traces):
        raise StartupError(f"{name('ENDPOINT')} {redacted(traces)!r} is not an http:// or https:// URL "
                           "(aiwfd exports OTLP over HTTP)")
    compression = var("COMPRESSION").lower()
    if compression not in ("", "none", "gzip"):
        raise StartupError(f"{name('COMPRESSION')} {compression!r} is not gzip or none")
    max_queue = _whole(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    max_batch = _whole(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, max_queue))
    if max_batch > max_queue:  # a full batch could never be queued (the SDK refuses it too)
        raise StartupError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE {max_batch} is more than "
                           f"OTEL_BSP_MAX_QUEUE_SIZE {max_queue}: a batch is taken from the queue")
    return TraceSettings(
        endpoint=traces,
        sampler=_sampler(env),
        resource=_resource(env),
        headers=_export_headers(name("HEADERS"), var("HEADERS")),
        timeout=_millis(env, name("TIMEOUT"), 10_000),
        gzip=compression == "gzip",
        ssl=_ssl(name, var("CERTIFICATE"), var("CLIENT_CERTIFICATE"), var("CLIENT_KEY")),
        schedule_delay=_millis(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
        max_queue=max_queue,
        max_batch=max_batch,
        export_timeout=_millis(env, "OTEL_BSP_EXPORT_TIMEOUT", 30_000),
        capture_content=env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower() == "true",
    )


def _sampler(env: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER / _ARG."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower() or "parentbased_always_on"
    base = name.removeprefix("parentbased_")
    # The argument is the ratio's only: other samplers ignore it (it may be set for another process).
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() if base == "traceidratio" else ""
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise StartupError(f"OTEL_TRACES_SAMPLER_ARG {arg!r} is not a number from 0 to 1")
    samplers = {"always_on": 1.0, "always_off": 0.0, "traceidratio": ratio}
    if base not in samplers:
        names = [*samplers, *(f"parentbased_{n}" for n in samplers)]
        raise StartupError(f"OTEL_TRACES_SAMPLER {name!r} is not one of {', '.join(names)}")
    return Sampler(samplers[base], parent_based=name != base)


def _resource(env: Mapping[str, str]) -> dict[str, Any]:
    """OTEL_RESOURCE_ATTRIBUTES (`k=v,…`, values URL-encoded), OTEL_SERVICE_NAME over its service.name."""
    out: dict[str, Any] = {"telemetry.sdk.name": "aiwfd", "telemetry.sdk.language": "python",
                           "telemetry.sdk.version": __version__, "process.runtime.name": platform.python_implementation(),
                           "process.runtime.version": platform.python_version()}
    out.update(_headers(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    out["service.name"] = env.get("OTEL_SERVICE_NAME", "").strip() or out.get("service.name") or "aiwfd"
    out.setdefault("service.version", __version__)
    return out


def _headers(raw: str) -> dict[str, str]:
    """`k=v,k2=v2` with URL-encoded values (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES)."""
    out = {}
    for part in raw.split(","):
        k, sep, v = part.partition("=")
        if sep and k.strip():
            out[k.strip()] = unquote(v.strip())
    return out


def _export_headers(var: str, raw: str) -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_HEADERS: refused at start when a header could not be sent (aiohttp would refuse
    every export, and the spans would be dropped for the life of the process)."""
    out = _headers(raw)
    for k, v in out.items():
        if not _TOKEN.fullmatch(k) or any(c in v for c in "\r\n\x00"):
            raise StartupError(f"{var} has a header that cannot be sent: {k!r} (a name is an HTTP token "
                               "such as x-api-key; a value has no line break)")
    return out


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _hostname(url: str) -> str | None:
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 (raises for a bad one)
        return u.hostname
    except ValueError:  # a bad port, an unclosed [
        return None


def _whole(env: Mapping[str, str], var: str, default: int) -> int:
    raw = env.get(var, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise StartupError(f"{var} {raw!r} is not a whole number above 0")
    return int(raw)


def _millis(env: Mapping[str, str], var: str, default: int) -> float:
    return _whole(env, var, default) / 1000


def _ssl(name: Callable[[str], str], ca: str, cert: str, key: str) -> ssl.SSLContext | None:
    """A TLS context for a private CA or a client certificate (mTLS); None: the system's defaults."""
    if not (ca or cert):
        return None
    try:
        context = ssl.create_default_context(cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        which = name("CERTIFICATE") if not cert else f"{name('CLIENT_CERTIFICATE')} / {name('CLIENT_KEY')}"
        raise StartupError(f"{which}: {e}") from None
    return context


def redacted(url: str) -> str:
    """The endpoint for the log and error messages: no user info, no query or
    fragment (either may hold a token); any string, a malformed URL too."""
    return re.sub(r"//[^/@]*@", "//", re.split(r"[?#]", url, maxsplit=1)[0])
