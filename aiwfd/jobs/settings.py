"""What a snapshot's jobs need from the environment: the webhook's secrets
and URL (SPEC §9.3), read once per load like the API keys, so a SIGHUP that
rotates `AIWF_WEBHOOK_SECRET` in .env takes effect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from aiwfd.errors import StartupError
from aiwfd.jobs.webhooks import parse_secrets
from aiwfd.spec.jobs import JobsConfig

__all__ = ["WebhookSettings", "webhook_settings"]


@dataclass(frozen=True)
class WebhookSettings:
    secrets: tuple[str, ...]
    url: str | None  # the configured webhook; None: only jobs naming their own (`Webhook-URL`) get one
    allow_private: bool
    retry_for: float

    def __repr__(self) -> str:  # the secrets never reach a log line, even by accident
        return f"WebhookSettings(url={self.url!r}, allow_private={self.allow_private}, retry_for={self.retry_for:g})"


def webhook_settings(jobs: JobsConfig, env: Mapping[str, str]) -> WebhookSettings | None:
    """None when no job can have a webhook; StartupError when one can and its
    secret (or the configured URL's variable) is missing or malformed."""
    if not jobs.signs:
        return None
    name = jobs.secret_env
    raw = env.get(name, "").strip()
    what = "jobs.webhook" if jobs.webhook is not None else "jobs.allow_request_webhooks"
    if not raw:
        raise StartupError(f"{what} is configured but the environment variable {name} (the webhook "
                           'secret, "whsec_" + base64) is not set (put it in the environment or the .env file)')
    try:
        secrets = parse_secrets(raw)
    except ValueError as e:
        raise StartupError(f"{name}: {e}") from None
    url = None
    w = jobs.webhook
    if w is not None:
        url = w.url
        if w.url_env is not None:
            url = env.get(w.url_env, "").strip() or None
            if url is None:
                raise StartupError(f"jobs.webhook.url_env: the environment variable {w.url_env} is not set")
            if not url.startswith(("http://", "https://")):
                raise StartupError(f"jobs.webhook.url_env: {w.url_env} is not an http:// or https:// URL")
    return WebhookSettings(secrets, url, w.allow_private if w is not None else False,
                           w.retry_for if w is not None else 24 * 3600.0)
