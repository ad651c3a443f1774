"""Where a provider's calls go and what they carry, resolved as the openai SDK resolves them.

SPEC §1.3: every network provider is configured as `openai.AsyncOpenAI`
configures itself (the same variables and defaults for key, base URL,
organization/project headers); tests/http/test_providers.py holds this equal to
the SDK's own resolution. Resolving them here, without the SDK, keeps its
import (~1 s) out of a start-up that never calls through it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from aiwfd.errors import StartupError
from aiwfd.spec.config import Provider

from aiwfd.providers.base import Transport

PUBLIC_BASE_URLS = {"openai": "https://api.openai.com/v1", "grok": "https://api.x.ai/v1"}
KEY_VARS = {"openai": "OPENAI_API_KEY", "grok": "GROK_API_KEY"}
BASE_URL_VARS = {"openai": "OPENAI_BASE_URL", "grok": "GROK_BASE_URL"}
# The SDK reads these for every client it builds, whatever its base URL.
ORGANIZATION_VAR = "OPENAI_ORG_ID"
PROJECT_VAR = "OPENAI_PROJECT_ID"


def key_var(provider: Provider) -> str | None:
    """The environment variable holding the provider's key (None: no key)."""
    if provider.kind in KEY_VARS:
        return KEY_VARS[provider.kind]
    return provider.api_key_env


def resolved(provider: Provider, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(base_url, api_key) from the config and the environment; raises when the key is missing."""
    var = key_var(provider)
    key = env.get(var) if var else None
    if var and not key:
        raise StartupError(f"{var} not set (needed by provider {provider.name!r})")
    if provider.kind in BASE_URL_VARS:
        base_url = env.get(BASE_URL_VARS[provider.kind]) or PUBLIC_BASE_URLS[provider.kind]
    else:
        assert provider.base_url
        base_url = provider.base_url
    return base_url, key


@dataclass(frozen=True)
class Endpoint:
    """One provider's chat-completions endpoint, as a client of it is built from."""

    provider: Provider
    base_url: str
    key: str | None
    organization: str | None
    project: str | None

    @classmethod
    def of(cls, provider: Provider, env: Mapping[str, str]) -> "Endpoint":
        base_url, key = resolved(provider, env)
        org = provider.organization if provider.organization is not None else env.get(ORGANIZATION_VAR)
        project = provider.project if provider.project is not None else env.get(PROJECT_VAR)
        return cls(provider, base_url, key, org, project)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict[str, str]:
        """What the SDK sends with every call, less its `X-Stainless-*` telemetry
        (which describes the SDK's own call path)."""
        headers = {"Accept": "application/json", "Content-Type": "application/json",
                   "User-Agent": f"AsyncOpenAI/Python {sdk_version()}"}
        if self.organization is not None:
            headers["OpenAI-Organization"] = self.organization
        if self.project is not None:
            headers["OpenAI-Project"] = self.project
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers


def signature(provider: Provider, env: Mapping[str, str], session: object | None,
              transport: Transport) -> tuple[Any, ...]:
    """What an OpenAICompatible client of `provider` would be built from (raises like `resolved`):
    a reload whose provider has the same signature keeps that client and its pooled connections."""
    return (Endpoint.of(provider, env), id(session), transport)


@functools.cache
def sdk_version() -> str:
    """The installed SDK's version, without importing it (~1 s) or importlib.metadata (~11 ms
    of start-up): read from the SDK's generated `_version.py`, the file its own User-Agent
    comes from; the metadata only when that file is not where it always was."""
    import importlib.util

    spec = importlib.util.find_spec("openai")  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            text = (Path(folder) / "_version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
        if m:
            return m.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openai")
    except PackageNotFoundError:  # pragma: no cover - a dependency of aiwfd
        return "unknown"
