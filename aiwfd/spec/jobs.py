"""The `jobs:` section of an agents file (SPEC §9): how many jobs run at once,
how long one may run and is kept, its lease, and the webhooks.

Only what the file says. Reading the webhook's URL and secret from the
environment happens when a snapshot is built (aiwfd.jobs.runner), so a
SIGHUP that rotates the secret in .env takes effect like a key rotation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiwfd.spec.access import _ENV_NAME_RE, _is_url

if TYPE_CHECKING:  # the loader hands itself in; config imports this module
    from aiwfd.spec import yamlsrc
    from aiwfd.spec.config import _Loader

JOBS_KEYS = ("concurrency", "timeout", "retention", "lease", "max_attempts", "webhook", "allow_request_webhooks")
WEBHOOK_KEYS = ("url", "url_env", "secret_env", "allow_private", "retry_for")
DEFAULT_SECRET_ENV = "AIWF_WEBHOOK_SECRET"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """`30`, `"500ms"`, `"30s"`, `"10m"`, `"2h"`, `"1d"` → seconds; None when it is not one (or ≤ 0)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None:
            return None
        seconds = float(m.group(1)) * _SCALE[m.group(2)]
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


@dataclass(frozen=True)
class WebhookConfig:
    url: str | None = None
    url_env: str | None = None
    secret_env: str = DEFAULT_SECRET_ENV
    allow_private: bool = False
    retry_for: float = 24 * 3600.0


@dataclass(frozen=True)
class JobsConfig:
    concurrency: int = 8
    timeout: float = 600.0
    retention: float = 24 * 3600.0
    # A running job's claim; renewed every lease/3, so a job whose instance
    # died runs again after at most this.
    lease: float = 30.0
    max_attempts: int = 5
    webhook: WebhookConfig | None = None
    allow_request_webhooks: tuple[str, ...] = ()

    @property
    def signs(self) -> bool:
        """Whether any job can have a webhook (and so a secret is needed)."""
        return self.webhook is not None or bool(self.allow_request_webhooks)

    @property
    def secret_env(self) -> str:
        return self.webhook.secret_env if self.webhook is not None else DEFAULT_SECRET_ENV

    def allows_webhook(self, url: str) -> bool:
        """Whether `url` is under a prefix of allow_request_webhooks, compared
        as the URL that will be called: scheme, host and port equal, the path
        (percent-decoded) under the prefix's, with no dot-segment (`/a/../b`,
        `%2e%2e`, which the client library would resolve out of the prefix) and
        no user info."""
        return any(_under(url, prefix) for prefix in self.allow_request_webhooks)


def load_jobs(ld: _Loader, src: yamlsrc.Source, section: Any) -> JobsConfig:
    if section is None:
        return JobsConfig()
    path: tuple[Any, ...] = ("jobs",)
    if not isinstance(section, dict):
        ld.err(src, path, "expected a mapping such as {concurrency: 8, timeout: 10m}")
        return JobsConfig()
    ld.check_keys(src, path, section, JOBS_KEYS)
    from aiwfd.spec.config import _int  # config imports this module

    d = JobsConfig()
    concurrency = _int(ld, src, path + ("concurrency",), section.get("concurrency"), d.concurrency, 1, 10_000)
    max_attempts = _int(ld, src, path + ("max_attempts",), section.get("max_attempts"), d.max_attempts, 1, 100)
    timeout = _duration(ld, src, path + ("timeout",), section.get("timeout"), d.timeout)
    retention = _duration(ld, src, path + ("retention",), section.get("retention"), d.retention)
    lease = _duration(ld, src, path + ("lease",), section.get("lease"), d.lease)
    if lease < 1.0:
        ld.err(src, path + ("lease",), f"expected at least 1s, got {section.get('lease')!r}",
               "it is renewed every third of itself while a job runs")
        lease = d.lease
    webhook = _webhook(ld, src, section.get("webhook"))
    prefixes = _prefixes(ld, src, section.get("allow_request_webhooks"))
    if webhook is not None and retention < webhook.retry_for:
        ld.warn(src, path + ("retention",), f"shorter than webhook.retry_for ({webhook.retry_for:g} s): a job "
                "removed after its retention takes its undelivered webhook with it")
    return JobsConfig(concurrency, timeout, retention, lease, max_attempts, webhook, prefixes)


def _webhook(ld: _Loader, src: yamlsrc.Source, section: Any) -> WebhookConfig | None:
    if section is None:
        return None
    path: tuple[Any, ...] = ("jobs", "webhook")
    if not isinstance(section, dict):
        ld.err(src, path, "expected a mapping with url: (or url_env:) and secret_env:")
        return None
    ld.check_keys(src, path, section, WEBHOOK_KEYS)
    url, url_env = section.get("url"), section.get("url_env")
    if url is not None and url_env is not None:
        # Without either, only jobs naming their own (`Webhook-URL`) get a webhook.
        ld.err(src, path, "expected url: or url_env:, not both", "url_env: names the variable holding the URL")
    if url is not None and not _is_url(url):
        ld.err(src, path + ("url",), f"expected an http:// or https:// URL, got {url!r}")
        url = None
    if url_env is not None and not _env_name(url_env):
        ld.err(src, path + ("url_env",), f"expected the name of an environment variable, got {url_env!r}")
        url_env = None
    secret_env = section.get("secret_env", DEFAULT_SECRET_ENV)
    if not _env_name(secret_env):
        ld.err(src, path + ("secret_env",), f"expected the name of an environment variable, got {secret_env!r}")
        secret_env = DEFAULT_SECRET_ENV
    allow_private = section.get("allow_private", False)
    if not isinstance(allow_private, bool):
        ld.err(src, path + ("allow_private",), f"expected true or false, got {allow_private!r}")
        allow_private = False
    retry_for = _duration(ld, src, path + ("retry_for",), section.get("retry_for"), 24 * 3600.0)
    return WebhookConfig(url, url_env, secret_env, allow_private, retry_for)


def _prefixes(ld: _Loader, src: yamlsrc.Source, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    path: tuple[Any, ...] = ("jobs", "allow_request_webhooks")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        ld.err(src, path, "expected a list of URL prefixes such as ['https://hooks.example.com/']")
        return ()
    out = []
    for i, p in enumerate(value):
        # A prefix must end its host (a "/" after it): "https://hooks.example.com"
        # would also allow https://hooks.example.com.evil.net/.
        if not _is_url(p) or not re.match(r"^https?://[^/\s]+/", p):
            ld.err(src, path + (i,), f"expected a URL prefix with a path, such as 'https://hooks.example.com/', got {p!r}",
                   "a prefix without a '/' after the host would also match other hosts")
            continue
        out.append(p)
    return tuple(out)


def _under(url: str, prefix: str) -> bool:
    from urllib.parse import unquote, urlsplit

    try:
        u, p = urlsplit(url), urlsplit(prefix)
        port, pport = u.port, p.port
    except ValueError:  # a port that is not a number
        return False
    if "\\" in url or u.username is not None or u.password is not None:
        return False
    if u.scheme.lower() != p.scheme.lower() or (u.hostname or "") != (p.hostname or "") or port != pport:
        return False
    path = unquote(u.path)
    if any(seg in (".", "..") for seg in path.split("/")):
        return False
    return path.startswith(unquote(p.path))


def _duration(ld: _Loader, src: yamlsrc.Source, path: tuple, v: Any, default: float) -> float:
    if v is None:
        return default
    seconds = parse_duration(v)
    if seconds is None:
        ld.err(src, path, f"expected a duration such as 30s, 10m or 24h, got {v!r}",
               "a number of seconds, or a number followed by ms, s, m, h or d")
        return default
    return seconds


def _env_name(v: Any) -> bool:
    return isinstance(v, str) and _ENV_NAME_RE.fullmatch(v) is not None
