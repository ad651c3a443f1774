"""The `auth:` and `limits:` sections of an agents file and an agent's `limits:` (SPEC §8).

Only what the file says: which clients exist, how their credentials are
found, which limits apply. Reading the environment for `key_env`, verifying
tokens and counting calls happen at run time (`aiwfd.auth`, `aiwfd.store`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the loader hands itself in; config imports this module
    from aiwfd.spec import yamlsrc
    from aiwfd.spec.config import _Loader

AUTH_KEYS = ("keys", "jwt")
CLIENT_KEYS = ("name", "key_env", "key_sha256", "agents", "limits")
JWT_KEYS = ("issuer", "audience", "jwks_url", "algorithms", "client_claim", "scope_prefix", "limits")
LIMITS_KEYS = ("default", "on_store_error")
LIMIT_SET_KEYS = ("requests", "tokens", "concurrency")
# Asymmetric only: a shared secret (HS*) would have to live in the agents file.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([A-Za-z]+)\s*$")
UNITS: dict[str, float] = {
    "s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "day": 86400,
}
# The names `API_KEY`'s keys get (SPEC §8.1): `api-key-1`, `api-key-2`, …
API_KEY_CLIENT = "api-key-{}"
OnStoreError = Literal["allow", "deny"]


@dataclass(frozen=True)
class Rate:
    quota: int
    window: float  # seconds

    def __str__(self) -> str:
        unit = next((u for u in ("day", "hour", "min", "s") if UNITS[u] == self.window), None)
        return f"{self.quota}/{unit}" if unit else f"{self.quota}/{self.window:g}s"


def parse_rate(value: Any) -> Rate | None:
    """`"600/min"` → Rate(600, 60); None when it is not a rate."""
    if not isinstance(value, str):
        return None
    m = _RATE_RE.fullmatch(value)
    if m is None:
        return None
    unit = m.group(2).lower()
    window = UNITS.get(unit)
    if window is None and len(unit) > 2 and unit.endswith("s"):  # plurals: 10/seconds, not 10/ss
        window = UNITS.get(unit[:-1])
    quota = int(m.group(1))
    if window is None or quota < 1:
        return None
    return Rate(quota, float(window))


@dataclass(frozen=True)
class LimitSet:
    requests: Rate | None = None
    tokens: Rate | None = None
    concurrency: int | None = None

    def __bool__(self) -> bool:
        return self.requests is not None or self.tokens is not None or self.concurrency is not None


@dataclass(frozen=True)
class KeyClient:
    """One `auth.keys` entry: a named client and how its key is found."""

    name: str
    key_env: str | None = None
    key_sha256: str | None = None  # lower-case hex
    agents: tuple[str, ...] | None = None  # None: every agent
    limits: LimitSet | None = None
    line: int | None = None


@dataclass(frozen=True)
class JWTConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256",)
    client_claim: str = "sub"
    scope_prefix: str | None = None
    limits: LimitSet | None = None


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[KeyClient, ...] = ()
    jwt: JWTConfig | None = None

    def __bool__(self) -> bool:
        return bool(self.keys) or self.jwt is not None


@dataclass(frozen=True)
class LimitsConfig:
    default: LimitSet | None = None
    on_store_error: OnStoreError = "allow"


# ---------------------------------------------------------------- loading


def load_limit_set(ld: _Loader, src: yamlsrc.Source, path: tuple[Any, ...], value: Any) -> LimitSet | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        ld.err(src, path, "expected a mapping such as {requests: 600/min, tokens: 200000/min, concurrency: 32}")
        return None
    ld.check_keys(src, path, value, LIMIT_SET_KEYS)
    rates: dict[str, Rate | None] = {}
    for key in ("requests", "tokens"):
        raw = value.get(key)
        rates[key] = None
        if raw is None:
            continue
        rate = parse_rate(raw)
        if rate is None:
            units = ", ".join(("s", "min", "hour", "day"))
            ld.err(src, path + (key,), f"expected a rate such as '600/min', got {raw!r}",
                   f"a whole number above 0, '/', and one of {units}")
        rates[key] = rate
    concurrency = value.get("concurrency")
    if concurrency is not None and (not isinstance(concurrency, int) or isinstance(concurrency, bool)
                                    or concurrency < 1):
        ld.err(src, path + ("concurrency",), f"expected a whole number ≥ 1, got {concurrency!r}")
        concurrency = None
    return LimitSet(rates["requests"], rates["tokens"], concurrency) or None


def load_auth(ld: _Loader, src: yamlsrc.Source, section: Any) -> AuthConfig:
    if section is None:
        return AuthConfig()
    if not isinstance(section, dict):
        ld.err(src, ("auth",), "expected a mapping with keys: and/or jwt:")
        return AuthConfig()
    ld.check_keys(src, ("auth",), section, AUTH_KEYS)
    return AuthConfig(_keys(ld, src, section.get("keys")), _jwt(ld, src, section.get("jwt")))


def _keys(ld: _Loader, src: yamlsrc.Source, section: Any) -> tuple[KeyClient, ...]:
    if section is None:
        return ()
    if not isinstance(section, list):
        ld.err(src, ("auth", "keys"), "expected a list of clients, each with name: and key_env: or key_sha256:")
        return ()
    out: list[KeyClient] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(section):
        path: tuple[Any, ...] = ("auth", "keys", i)
        if not isinstance(item, dict):
            ld.err(src, path, "expected a mapping with name: and key_env: or key_sha256:")
            continue
        n_before = len(ld.problems)
        ld.check_keys(src, path, item, CLIENT_KEYS)
        name = item.get("name")
        if not isinstance(name, str) or not CLIENT_NAME_RE.fullmatch(name):
            ld.err(src, path + ("name",), "expected a client name (letters, digits, _ . -; up to 64)",
                   None if "name" in item else "every key needs a name: it is the client in logs and limits")
        elif name in seen or re.fullmatch(r"api-key-\d+", name):
            ld.err(src, path + ("name",), f"client name {name!r} is already taken",
                   "api-key-N names the keys of API_KEY" if name not in seen else "names must be unique")
        else:
            seen[name] = i
        key_env, digest = item.get("key_env"), item.get("key_sha256")
        if (key_env is None) == (digest is None):
            ld.err(src, path, "give exactly one of key_env: or key_sha256:",
                   "key_env names an environment variable; key_sha256 is the key's SHA-256 in hex")
        if key_env is not None and not (isinstance(key_env, str) and _ENV_NAME_RE.fullmatch(key_env)):
            ld.err(src, path + ("key_env",), "expected the name of an environment variable")
        if digest is not None and not (isinstance(digest, str) and _SHA256_RE.fullmatch(digest)):
            ld.err(src, path + ("key_sha256",), "expected 64 hex digits (the key's SHA-256)",
                   "printf %s \"$KEY\" | sha256sum")
        agents = item.get("agents")
        if agents is not None and not (isinstance(agents, list) and all(isinstance(a, str) for a in agents)):
            ld.err(src, path + ("agents",), "expected a list of agent names")
            agents = None
        limits = load_limit_set(ld, src, path + ("limits",), item.get("limits"))
        if len(ld.problems) != n_before:
            continue
        assert isinstance(name, str)
        out.append(KeyClient(name, key_env, digest.lower() if isinstance(digest, str) else None,
                             tuple(agents) if agents is not None else None, limits, src.line(path)))
    return tuple(out)


def _jwt(ld: _Loader, src: yamlsrc.Source, section: Any) -> JWTConfig | None:
    if section is None:
        return None
    path: tuple[Any, ...] = ("auth", "jwt")
    if not isinstance(section, dict):
        ld.err(src, path, "expected a mapping with issuer: and audience:")
        return None
    n_before = len(ld.problems)
    ld.check_keys(src, path, section, JWT_KEYS)
    issuer, audience, jwks_url = section.get("issuer"), section.get("audience"), section.get("jwks_url")
    if not _is_url(issuer):
        ld.err(src, path + ("issuer",), "expected the issuer's URL (its `iss`, e.g. https://login.example.com/realms/main)",
               None if "issuer" in section else "discovery reads {issuer}/.well-known/openid-configuration")
    if not isinstance(audience, str) or not audience:
        ld.err(src, path + ("audience",), "expected the audience tokens must carry (their `aud`)")
    if jwks_url is not None and not _is_url(jwks_url):
        ld.err(src, path + ("jwks_url",), "expected an http:// or https:// URL")
    algorithms = section.get("algorithms", ["RS256"])
    if isinstance(algorithms, str):
        algorithms = [algorithms]
    if not isinstance(algorithms, list) or not algorithms:
        ld.err(src, path + ("algorithms",), "expected a list such as [RS256, ES256]")
        algorithms = ["RS256"]
    for a in algorithms:
        if a not in JWT_ALGORITHMS:
            hint = ("a shared secret would have to be in this file; use an asymmetric algorithm"
                    if isinstance(a, str) and a.upper().startswith("HS") else f"one of {', '.join(JWT_ALGORITHMS)}")
            ld.err(src, path + ("algorithms",), f"unsupported algorithm {a!r}", hint)
    claim = section.get("client_claim", "sub")
    if not isinstance(claim, str) or not claim:
        ld.err(src, path + ("client_claim",), "expected the name of a claim, such as sub or azp")
    prefix = section.get("scope_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix or " " in prefix):
        ld.err(src, path + ("scope_prefix",), "expected a scope prefix such as 'aiwfd:'")
    limits = load_limit_set(ld, src, path + ("limits",), section.get("limits"))
    if len(ld.problems) != n_before:
        return None
    assert isinstance(issuer, str) and isinstance(audience, str)
    return JWTConfig(issuer, audience, jwks_url, tuple(algorithms), claim, prefix, limits)


def load_limits(ld: _Loader, src: yamlsrc.Source, section: Any) -> LimitsConfig:
    if section is None:
        return LimitsConfig()
    if not isinstance(section, dict):
        ld.err(src, ("limits",), "expected a mapping with default: and on_store_error:")
        return LimitsConfig()
    ld.check_keys(src, ("limits",), section, LIMITS_KEYS)
    default = load_limit_set(ld, src, ("limits", "default"), section.get("default"))
    on_error = section.get("on_store_error", "allow")
    if on_error not in ("allow", "deny"):
        ld.err(src, ("limits", "on_store_error"), f"expected allow or deny, got {on_error!r}",
               "allow: calls pass while the store does not answer; deny: they get 503")
        on_error = "allow"
    return LimitsConfig(default, on_error)


def check_allowlists(ld: _Loader, src: yamlsrc.Source, auth: AuthConfig, agents: Any) -> None:
    """Every agent an allowlist names exists (once the assistants are known)."""
    from aiwfd.spec.config import did_you_mean

    for i, client in enumerate(auth.keys):
        for a in client.agents or ():
            if a not in agents:
                hint = did_you_mean(a, agents)
                ld.err(src, ("auth", "keys", i, "agents"), f"unknown agent {a!r}", hint)


def _is_url(v: Any) -> bool:
    return isinstance(v, str) and re.match(r"^https?://[^\s/]+", v) is not None
