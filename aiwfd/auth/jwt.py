"""JWT bearer tokens verified against an OIDC issuer's JWKS (SPEC §8.1).

    verifier = Verifier(JWTSettings(issuer=..., audience="aiwfd"), session)
    await verifier.start()             # first fetch in the background, never raises
    claims = await verifier.verify(token)   # TokenError -> 401, KeysUnavailable -> 503

The key set is fetched with the daemon's aiohttp session (PyJWT's PyJWKClient
blocks the event loop) and loaded with ``jwt.PyJWKSet.from_dict`` once per
refresh, behind one asyncio.Lock:

- discovery (``{issuer}/.well-known/openid-configuration`` -> ``jwks_uri``)
  unless ``jwks_url`` is set;
- kept for the JWKS answer's ``Cache-Control: max-age`` (minus ``Age``),
  bounded to 5 min ... 24 h; refreshed by a background task at 90 % of that,
  and, should that task fall behind, a verify that finds the set stale starts a
  refresh without waiting for it;
- a token whose ``kid`` is not in the set refetches it, at most once per 30 s
  (a burst of forged kids costs the issuer one request; the waiters share it
  through the lock); still unknown -> "unknown key id";
- a failed refresh keeps the last set serving (the issuer being down must not
  log everybody out); failing before any set loaded, verify raises
  KeysUnavailable and the background task retries, 1 s doubling to 30 s.

Algorithms come from the settings, never from the token, and only asymmetric
ones are accepted: the JWKS is public, so an HS* algorithm would let anybody
holding it sign (the "RSA public key as HMAC secret" confusion).

Verified tokens are remembered by their SHA-256 (bounded, each until its exp
plus the leeway, dropped when a refresh removes its kid): a repeated token
costs a hash and a lookup instead of an RSA verify and PyJWT's base64 checks
(scripts/bench_jwt.py has the figures).

Nothing here logs a token or a claim: only URLs and causes of fetch failures.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import jwt

from aiwfd.auth.errors import KeysUnavailable, TokenError  # re-exported: raised here

__all__ = [
    "ALLOWED_ALGORITHMS",
    "Claims",
    "JWTSettings",
    "KeysUnavailable",
    "TokenError",
    "Verifier",
    "cache_ttl",
]

logger = logging.getLogger("aiwfd")

# Asymmetric only: with a public key set, a symmetric algorithm is a forgery kit.
ALLOWED_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})
LEEWAY = 60.0  # s, on exp and nbf: the clocks of the issuer and of this host differ
MIN_TTL = 300.0  # s: the bounds of a key set's life, whatever the issuer's Cache-Control says
MAX_TTL = 86400.0
REFRESH_AT = 0.9  # the background refresh runs at this fraction of the set's life, before it goes stale
KID_REFETCH_INTERVAL = 30.0  # s: at most one refetch for an unknown kid in this long
FETCH_TIMEOUT = 5.0  # s per request: verifies of an unknown kid wait this long at most
MAX_DOCUMENT = 1 << 20  # bytes: a discovery document or a JWKS larger than this is refused
MAX_TOKEN = 16384  # bytes: longer bearer values are refused before any work
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class JWTSettings:
    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_url: str | None = None  # else discovery
    client_claim: str = "sub"
    scope_prefix: str | None = None  # e.g. "aiwfd:"

    def __post_init__(self) -> None:
        # A list from YAML would make the frozen settings unhashable and mutable.
        object.__setattr__(self, "algorithms", tuple(self.algorithms))
        if not self.issuer:
            raise ValueError("jwt.issuer is empty")
        if not self.audience:
            raise ValueError("jwt.audience is empty")
        if not self.algorithms:
            raise ValueError("jwt.algorithms is empty")
        bad = [a for a in self.algorithms if a not in ALLOWED_ALGORITHMS]
        if bad:
            raise ValueError(f"jwt.algorithms: {', '.join(map(str, bad))} not allowed "
                             f"(one of {', '.join(sorted(ALLOWED_ALGORITHMS))})")
        if not self.client_claim:
            raise ValueError("jwt.client_claim is empty")

    @property
    def discovery_url(self) -> str:
        # OpenID Connect Discovery 1.0 §4: strip a trailing slash, then append.
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True)
class Claims:
    client: str  # the value of client_claim
    scopes: frozenset[str]  # from "scope" (space-separated) or "scp" (a list, or a string as Azure sends it)
    expires: float  # exp

    def allows(self, agent: str, prefix: str | None) -> bool:
        """Without a prefix every agent; else the token needs scope prefix+agent or prefix+"*"."""
        if prefix is None:
            return True
        return prefix + agent in self.scopes or prefix + "*" in self.scopes


class _FetchError(Exception):
    """A short cause for the reason of /health/ready and the log."""

    def __init__(self, cause: str, status: int | None = None) -> None:
        super().__init__(cause)
        self.status = status


def cache_ttl(cache_control: str | None, age: str | None = None) -> float:
    """Seconds to keep a JWKS: its max-age less its Age, bounded to MIN_TTL...MAX_TTL.
    No max-age (or no-store/no-cache) -> the floor: the issuer said nothing, so
    rotations are seen soonest."""
    max_age: float | None = None
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return MIN_TTL
        if name == "max-age":
            with contextlib.suppress(ValueError):
                max_age = float(int(value.strip().strip('"')))
    if max_age is None:
        return MIN_TTL
    if age:
        with contextlib.suppress(ValueError):
            max_age -= max(0, int(age.strip()))
    return min(max(max_age, MIN_TTL), MAX_TTL)


_B64_PAD = ("", "", "==", "=")
_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


class _FastJWS(jwt.PyJWS):
    """PyJWT's JWS, its base64url segment check done at C speed.

    PyJWT 2.15 checks every character of every segment against the alphabet in
    a Python generator: ~40 µs of the ~80 µs a 1 KB RS256 token costs
    (scripts/bench_jwt.py). This is the same check, rule for rule (at most two
    '=' and only on a length multiple of 4, nothing outside the alphabet, no
    length 1 mod 4, canonical: re-encoding gives the segment back), with a
    regular expression and binascii. Everything else (crit, b64, the algorithm
    against the key, the signature) stays PyJWT's. Should a PyJWT release
    rename the method, it is simply not called: slower, still as strict
    (tests/http/test_jwt.py checks it is in use and agrees with PyJWT's).
    """

    @staticmethod
    def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
        stripped = segment.rstrip(b"=")
        padding = len(segment) - len(stripped)
        if (padding > 2 or (padding and len(segment) % 4) or len(stripped) % 4 == 1
                or _B64URL.fullmatch(stripped) is None):
            raise jwt.DecodeError(f"Invalid {name} padding")
        decoded = base64.urlsafe_b64decode(stripped + _B64_PAD[len(stripped) % 4].encode())
        if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:
            raise jwt.DecodeError(f"Invalid {name} padding")
        return decoded


def _header(token: str) -> dict[str, Any]:
    """The token's JOSE header, to choose the key. PyJWT parses it again, strictly,
    when it verifies; parsing it here once is cheaper than its get_unverified_header,
    which checks all three segments character by character (~24 µs)."""
    if token.count(".") != 2:
        raise TokenError("the token is malformed")
    segment = token[:token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + _B64_PAD[len(segment) % 4]))
    except (ValueError, binascii.Error):
        raise TokenError("the token is malformed") from None
    if not isinstance(header, dict):
        raise TokenError("the token is malformed")
    return header


def _describe(e: jwt.PyJWTError) -> str:
    # Order matters: InvalidSignatureError is a DecodeError.
    if isinstance(e, jwt.InvalidSignatureError):
        return "the token's signature is invalid"
    if isinstance(e, jwt.InvalidAlgorithmError):
        return "the token's algorithm is not allowed"
    if isinstance(e, jwt.InvalidIssuerError):
        return "the token's issuer is not accepted"
    if isinstance(e, jwt.InvalidAudienceError):
        return "the token is not meant for this audience"
    if isinstance(e, jwt.MissingRequiredClaimError):
        if e.claim == "iss":
            return "the token's issuer is not accepted"
        if e.claim == "aud":
            return "the token is not meant for this audience"
        return "the token lacks a required claim"
    if isinstance(e, jwt.DecodeError):
        return "the token is malformed"
    return "the token is invalid"


def _signing_keys(keyset: jwt.PyJWKSet) -> list[jwt.PyJWK]:
    # Encryption keys do not sign; a published symmetric key is nobody's secret.
    return [k for k in keyset.keys if k.public_key_use != "enc" and k.key_type != "oct"]


class Verifier:
    """Verifies bearer tokens against the issuer's JWKS; see the module docstring.

    Beyond the settings and the session: ``clock`` (exp, nbf) and ``monotonic``
    (the set's life, the 30 s refetch interval) for tests to move by hand;
    ``cache_size`` of the verified-token cache (0: none); ``backoff``, the
    first and the largest delay between failed fetches. ``fetches`` counts the
    JWKS requests, ``attempts`` every refresh tried (discovery included).
    One Verifier per settings: a reload with other settings makes a new one
    (the token cache holds what these settings accepted).
    """

    def __init__(
        self,
        settings: JWTSettings,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        cache_size: int = CACHE_SIZE,
        backoff: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        self.settings = settings
        self._session = session
        self._clock = clock  # exp / nbf
        self._monotonic = monotonic  # the set's life, the refetch interval
        self._cache_size = cache_size  # 0: no verified-token cache (the benchmark's baseline)
        self._backoff = backoff  # first retry delay, largest delay (tests shorten it)
        # PyJWT checks the signature, the algorithm against the key, iss, aud;
        # exp and nbf are checked here, against the injectable clock.
        self._decoder = jwt.PyJWT({"verify_exp": False, "verify_nbf": False, "verify_iat": False})
        self._decoder._jws = _FastJWS()  # decode_complete passes its signature options on each call
        self._algorithms = list(settings.algorithms)
        self._lock = asyncio.Lock()
        self._loaded = asyncio.Event()
        self._by_kid: dict[str, list[jwt.PyJWK]] = {}
        self._keys: list[jwt.PyJWK] | None = None  # None until a set loaded
        self._stale_at = 0.0
        self._refresh_at = 0.0
        self._last_attempt: float | None = None
        self._last_kid_refetch: float | None = None
        self._jwks_uri: str | None = settings.jwks_url
        self._cause: str | None = "the first fetch has not finished"
        self._failing = False
        self._cache: OrderedDict[bytes, tuple[Claims, str | None]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._stale_task: asyncio.Task[None] | None = None
        self.fetches = 0  # JWKS requests made (for tests)
        self.attempts = 0  # refreshes tried, discovery included, successful or not (for tests)

    # -- life --------------------------------------------------------------

    async def start(self) -> None:
        """Start the background fetcher; returns at once and never raises."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aiwfd-jwks")

    async def close(self) -> None:
        for task in (self._task, self._stale_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._stale_task = None

    @property
    def ready(self) -> bool:
        """A key set is loaded."""
        return self._keys is not None

    @property
    def reason(self) -> str | None:
        """Why not ready, for /health/ready; None when ready."""
        if self._keys is not None:
            return None
        return f"the issuer's keys are not loaded yet: {self._cause}"

    async def wait_ready(self) -> None:
        """Until a key set is loaded (tests; a start-up that wants to wait a little)."""
        await self._loaded.wait()

    # -- verify ------------------------------------------------------------

    async def verify(self, token: str) -> Claims:
        if len(token) > MAX_TOKEN:
            raise TokenError("the token is too long")
        now = self._clock()
        try:
            digest = hashlib.sha256(token.encode("ascii")).digest()
        except UnicodeEncodeError:
            raise TokenError("the token is malformed") from None
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit[0].expires + LEEWAY:
                self._refresh_if_stale()
                return hit[0]
            del self._cache[digest]

        header = _header(token)
        alg = header.get("alg")
        if alg not in self._algorithms:  # "none", HS256, anything the config does not name
            raise TokenError("the token's algorithm is not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("the token is malformed")
        if self._keys is None:
            raise KeysUnavailable(self.reason)
        self._refresh_if_stale()
        key = await self._key(kid, alg)

        try:
            payload = self._decoder.decode(token, key=key, algorithms=self._algorithms,
                                           audience=self.settings.audience, issuer=self.settings.issuer)
        except jwt.PyJWTError as e:
            raise TokenError(_describe(e)) from None
        claims = self._claims(payload, now)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)  # the oldest: every entry is a verified token, so FIFO is enough
            self._cache[digest] = (claims, kid)
        return claims

    async def _key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        if kid is None:
            # No kid: only unambiguous when one key of the set has the token's algorithm.
            assert self._keys is not None
            matching = [k for k in self._keys if k.algorithm_name == alg]
            if len(matching) != 1:
                raise TokenError("the token names no key id")
            return matching[0]
        keys = self._by_kid.get(kid)
        if keys is None:
            keys = await self._refetch_for(kid)
            if keys is None:
                raise TokenError("unknown key id")
        for k in keys:
            if k.algorithm_name == alg:
                return k
        raise TokenError("the token's algorithm does not match its key")

    def _claims(self, payload: dict[str, Any], now: float) -> Claims:
        exp = payload.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise TokenError("the token has no valid expiry")
        if exp <= now - LEEWAY:
            raise TokenError("the token has expired")
        nbf = payload.get("nbf")
        if nbf is not None:
            if not isinstance(nbf, (int, float)) or isinstance(nbf, bool):
                raise TokenError("the token is malformed")
            if nbf > now + LEEWAY:
                raise TokenError("the token is not valid yet")
        client = payload.get(self.settings.client_claim)
        if not isinstance(client, str) or not client:
            raise TokenError(f"the token has no {self.settings.client_claim} claim naming the client")
        scopes: set[str] = set()
        scope = payload.get("scope")
        if isinstance(scope, str):
            scopes.update(scope.split())
        scp = payload.get("scp")
        if isinstance(scp, str):
            scopes.update(scp.split())
        elif isinstance(scp, list):
            scopes.update(s for s in scp if isinstance(s, str))
        return Claims(client=client, scopes=frozenset(scopes), expires=float(exp))

    # -- fetching ----------------------------------------------------------

    async def _refetch_for(self, kid: str) -> list[jwt.PyJWK] | None:
        """The keys of an unknown kid after at most one refetch per KID_REFETCH_INTERVAL."""
        async with self._lock:
            keys = self._by_kid.get(kid)  # a fetch we waited for may have brought it
            if keys is not None:
                return keys
            now = self._monotonic()
            if self._last_kid_refetch is not None and now - self._last_kid_refetch < KID_REFETCH_INTERVAL:
                return None
            self._last_kid_refetch = now
            await self._fetch()
            return self._by_kid.get(kid)

    def _refresh_if_stale(self) -> None:
        """A verify found the set past its life (the background task fell behind or
        failed): refresh without making the caller wait, at most every 30 s."""
        now = self._monotonic()
        if now < self._stale_at or (self._stale_task is not None and not self._stale_task.done()):
            return
        if self._last_attempt is not None and now - self._last_attempt < KID_REFETCH_INTERVAL:
            return
        self._stale_task = asyncio.get_running_loop().create_task(self._refresh_stale(), name="aiwfd-jwks-stale")

    async def _refresh_stale(self) -> None:
        async with self._lock:
            if self._monotonic() >= self._stale_at:
                await self._fetch()

    async def _run(self) -> None:
        """The background fetcher: the first set, retries with backoff, refreshes before staleness."""
        first, largest = self._backoff
        delay = first
        while True:
            async with self._lock:
                due = self._keys is None or self._monotonic() >= self._refresh_at
                ok = await self._fetch() if due else True
            if not ok:
                await asyncio.sleep(delay)
                delay = min(delay * 2, largest)
                continue
            delay = first
            await asyncio.sleep(max(self._refresh_at - self._monotonic(), 1.0))

    async def _fetch(self) -> bool:
        """Fetch and install the key set (the lock held). False, with the cause kept, on failure."""
        self._last_attempt = self._monotonic()
        self.attempts += 1
        url = self._jwks_uri or self.settings.discovery_url
        try:
            if self._jwks_uri is None:
                url = self._jwks_uri = await self._discover()
            self.fetches += 1
            document, headers = await self._get(url)
            try:
                keys = _signing_keys(jwt.PyJWKSet.from_dict(document))
            except jwt.PyJWTError:
                keys = []
            if not keys:
                raise _FetchError(f"{url}: no usable signing keys")
        except _FetchError as e:
            if self.settings.jwks_url is None and e.status in (404, 410):
                self._jwks_uri = None  # the jwks_uri moved: discover again next time
            self._failed(str(e))
            return False
        except Exception as e:  # a bug must not end the background task: it would never retry
            logger.exception("loading the issuer's keys from %s failed", url)
            self._failed(f"{url}: {type(e).__name__}")
            return False
        self._install(keys, cache_ttl(headers.get("Cache-Control"), headers.get("Age")), url)
        return True

    async def _discover(self) -> str:
        url = self.settings.discovery_url
        document, _ = await self._get(url)
        # OpenID Connect Discovery §4.3: the document must name the issuer it is for.
        if document.get("issuer") != self.settings.issuer:
            raise _FetchError(f"{url}: the discovery document is for another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise _FetchError(f"{url}: the discovery document has no jwks_uri")
        return jwks_uri

    async def _get(self, url: str) -> tuple[dict[str, Any], Any]:
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
                                         headers={"Accept": "application/json"}) as r:
                if r.status != 200:
                    raise _FetchError(f"{url}: HTTP {r.status}", r.status)
                body = bytearray()
                async for chunk in r.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        raise _FetchError(f"{url}: larger than {MAX_DOCUMENT} bytes")
                headers = r.headers
        except asyncio.TimeoutError:
            raise _FetchError(f"{url}: no answer in {FETCH_TIMEOUT:g} s") from None
        except aiohttp.ClientConnectorError as e:
            # asyncio's strerror carries the address again: the errno's text is enough.
            why = os.strerror(e.os_error.errno) if e.os_error.errno else str(e.os_error)
            raise _FetchError(f"{url}: cannot connect ({why})") from None
        except aiohttp.ClientError as e:
            raise _FetchError(f"{url}: {type(e).__name__}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise _FetchError(f"{url}: the answer is not JSON") from None
        if not isinstance(document, dict):
            raise _FetchError(f"{url}: the answer is not a JSON object")
        return document, headers

    def _install(self, keys: list[jwt.PyJWK], ttl: float, url: str) -> None:
        by_kid: dict[str, list[jwt.PyJWK]] = {}
        for k in keys:
            if isinstance(k.key_id, str):
                by_kid.setdefault(k.key_id, []).append(k)
        now = self._monotonic()
        first = self._keys is None
        recovered = self._failing
        self._keys, self._by_kid = keys, by_kid
        self._stale_at = now + ttl
        self._refresh_at = now + ttl * REFRESH_AT
        self._cause = None
        self._failing = False
        # A token verified by a key the issuer no longer publishes must not outlive the key.
        for digest in [d for d, (_, kid) in self._cache.items() if kid is None or kid not in by_kid]:
            del self._cache[digest]
        self._loaded.set()
        if first or recovered:
            logger.info("loaded %d signing keys of the issuer from %s (kept %gs)", len(keys), url, ttl)
        else:
            logger.debug("refreshed %d signing keys of the issuer from %s (kept %gs)", len(keys), url, ttl)

    def _failed(self, cause: str) -> None:
        self._cause = cause
        # One warning per run of failures, not one per retry.
        if not self._failing:
            if self._keys is None:
                logger.warning("cannot load the issuer's keys (%s); JWT calls get 503 until they load; retrying", cause)
            else:
                logger.warning("cannot refresh the issuer's keys (%s); the last key set keeps serving", cause)
        self._failing = True
