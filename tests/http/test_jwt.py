"""JWT bearer tokens against a real OIDC issuer on loopback (aiwfd.testing.issuer),
over real HTTP (SPEC §8.1): what passes, what is refused and why, the JWKS cache,
rotation, unknown kids, the issuer going down. Clocks are injected rather than
slept on; waits are on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jwt
import pytest

from aiwfd.auth.jwt import (
    Claims,
    JWTSettings,
    KeysUnavailable,
    TokenError,
    Verifier,
    cache_ttl,
)
from aiwfd.testing.issuer import Issuer


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def reason_has(v: Verifier, cause: str) -> Callable[[], bool]:
    return lambda: cause in (v.reason or "")


def attempted(v: Verifier, n: int) -> Callable[[], bool]:
    return lambda: v.attempts == n


@pytest.fixture(scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(scope="module")
async def iss() -> AsyncIterator[Issuer]:
    # PS256: a key the issuer signs with that the settings below do not allow.
    async with Issuer(algorithms=("RS256", "ES256", "PS256")) as i:
        yield i


def settings_for(iss: Issuer, **kw: Any) -> JWTSettings:
    kw.setdefault("algorithms", ("RS256", "ES256"))
    return JWTSettings(issuer=iss.issuer, audience=iss.audience, **kw)


@contextlib.asynccontextmanager
async def verifier(iss: Issuer, session: aiohttp.ClientSession, *, ready: bool = True,
                   settings: JWTSettings | None = None, **kw: Any) -> AsyncIterator[Verifier]:
    v = Verifier(settings or settings_for(iss), session, **kw)
    await v.start()
    try:
        if ready:
            await asyncio.wait_for(v.wait_ready(), 5)
        yield v
    finally:
        await v.close()


async def refused(v: Verifier, token: str) -> str:
    with pytest.raises(TokenError) as e:
        await v.verify(token)
    # The description goes into WWW-Authenticate: never the token, never a claim.
    assert token not in e.value.description and "test-client" not in e.value.description
    return e.value.description


# -- what passes ------------------------------------------------------------


async def test_valid_rs256_and_es256_tokens_pass(iss: Issuer, session: aiohttp.ClientSession) -> None:
    async with verifier(iss, session) as v:
        assert v.ready and v.reason is None
        for alg in ("RS256", "ES256"):
            token = iss.mint(alg=alg, scope="openid aiwfd:greeter")
            claims = await v.verify(token)
            assert claims.client == "test-client"
            assert claims.scopes == frozenset({"openid", "aiwfd:greeter"})
            assert claims.expires == pytest.approx(time.time() + 300, abs=5)
        assert v.fetches == 1


async def test_client_claim_and_scp(iss: Issuer, session: aiohttp.ClientSession) -> None:
    async with verifier(iss, session, settings=settings_for(iss, client_claim="azp")) as v:
        claims = await v.verify(iss.mint(azp="frontend", scope=None, scp=["aiwfd:a", "aiwfd:b", 7]))
        assert claims == Claims("frontend", frozenset({"aiwfd:a", "aiwfd:b"}), claims.expires)
        # Azure AD sends scp as a space-separated string.
        assert (await v.verify(iss.mint(scope=None, scp="aiwfd:c aiwfd:d"))).scopes == {"aiwfd:c", "aiwfd:d"}
        assert "azp" in await refused(v, iss.mint(azp=None))
        await refused(v, iss.mint(azp=["not", "a", "string"]))


async def test_leeway_of_60_seconds(iss: Issuer, session: aiohttp.ClientSession) -> None:
    async with verifier(iss, session) as v:
        now = int(time.time())
        await v.verify(iss.mint(exp=now - 30))
        await v.verify(iss.mint(nbf=now + 30))
        assert await refused(v, iss.mint(exp=now - 90)) == "the token has expired"
        assert await refused(v, iss.mint(nbf=now + 90)) == "the token is not valid yet"


async def test_a_token_without_kid_is_unambiguous_only_with_one_key_of_its_algorithm(
        session: aiohttp.ClientSession) -> None:
    async with Issuer() as iss, verifier(iss, session, monotonic=Clock(0.0)) as v:
        await v.verify(iss.mint(headers={"kid": None}))  # one RS256 key, one ES256 key
        iss.rotate("RS256", keep=True)
        # Two RS256 keys now: a refresh brings the second, and the kid-less token is ambiguous.
        await v.verify(iss.mint())  # the new kid: one refetch
        assert await refused(v, iss.mint(headers={"kid": None})) == "the token names no key id"


# -- what is refused ----------------------------------------------------------


def forged(iss: Issuer) -> str:
    """The header and claims of one token with the signature of another, same key."""
    a, b = iss.mint(sub="alice"), iss.mint(sub="mallory")
    return b.rsplit(".", 1)[0] + "." + a.rsplit(".", 1)[1]


REFUSALS: dict[str, tuple[Callable[[Issuer], str], str]] = {
    "expired": (lambda i: i.mint(lifetime=-120), "the token has expired"),
    "not yet valid": (lambda i: i.mint(nbf=int(time.time()) + 600), "the token is not valid yet"),
    "wrong iss": (lambda i: i.mint(iss="https://evil.example.com"), "the token's issuer is not accepted"),
    "no iss": (lambda i: i.mint(iss=None), "the token's issuer is not accepted"),
    "wrong aud": (lambda i: i.mint(aud="someone-else"), "the token is not meant for this audience"),
    "aud list without us": (lambda i: i.mint(aud=["a", "b"]), "the token is not meant for this audience"),
    "no exp": (lambda i: i.mint(exp=None), "the token has no valid expiry"),
    "exp not a number": (lambda i: i.mint(exp="tomorrow"), "the token has no valid expiry"),
    "bad signature": (forged, "the token's signature is invalid"),
    "ES256 bad signature": (lambda i: i.mint(alg="ES256", headers={"kid": i.signing_kid("ES256")})[:-8] + "AAAAAAAA",
                            "the token's signature is invalid"),
    "alg none": (lambda i: i.mint(alg="none"), "the token's algorithm is not allowed"),
    "alg none with a kid": (lambda i: i.mint(alg="none", headers={"kid": i.signing_kid()}),
                            "the token's algorithm is not allowed"),
    "HS256 with the public key as secret": (lambda i: i.mint(alg="HS256"), "the token's algorithm is not allowed"),
    "an algorithm the config does not name": (lambda i: i.mint(alg="PS256"), "the token's algorithm is not allowed"),
    "alg of another key": (lambda i: i.mint(alg="ES256", headers={"kid": i.signing_kid("RS256")}),
                           "the token's algorithm does not match its key"),
    "unknown kid": (lambda i: i.mint(kid="nobody-knows"), "unknown key id"),
    "malformed": (lambda i: "not-a-token", "the token is malformed"),
    "three garbage parts": (lambda i: "a.b.c", "the token is malformed"),
    "header not an object": (lambda i: "WzFd.e30.", "the token is malformed"),
    "non-ASCII": (lambda i: i.mint() + "é", "the token is malformed"),
    "payload not base64": (lambda i: (lambda p: f"{p[0]}.!!!!.{p[2]}")(i.mint().split(".")), "the token is malformed"),
    "too long": (lambda i: i.mint(blob="x" * 20000), "the token is too long"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused(case: str, iss: Issuer, session: aiohttp.ClientSession,
                       caplog: pytest.LogCaptureFixture) -> None:
    make, description = REFUSALS[case]
    caplog.set_level(logging.DEBUG)
    async with verifier(iss, session) as v:
        token = make(iss)
        assert await refused(v, token) == description
    assert token not in caplog.text


def test_settings_refuse_symmetric_and_none_algorithms() -> None:
    # With a public JWKS, HS* means anybody can sign: refused at config time.
    for alg in ("HS256", "none", "RS257"):
        with pytest.raises(ValueError, match="not allowed"):
            JWTSettings(issuer="https://i", audience="a", algorithms=(alg,))
    assert JWTSettings(issuer="https://i", audience="a", algorithms=["ES256"]).algorithms == ("ES256",)  # type: ignore[arg-type]


def test_claims_allows_with_a_prefix() -> None:
    c = Claims("frontend", frozenset({"openid", "aiwfd:greeter"}), 0.0)
    assert c.allows("anything", None)
    assert c.allows("greeter", "aiwfd:")
    assert not c.allows("reviewer", "aiwfd:")
    assert not c.allows("greeter", "other:")
    star = Claims("ops", frozenset({"aiwfd:*"}), 0.0)
    assert star.allows("greeter", "aiwfd:") and star.allows("reviewer", "aiwfd:")
    assert not Claims("x", frozenset({"greeter"}), 0.0).allows("greeter", "aiwfd:")


# -- keys: rotation, unknown kids, the cache ---------------------------------


async def test_rotation_is_picked_up_with_one_refetch(session: aiohttp.ClientSession) -> None:
    mono = Clock(1000.0)
    async with Issuer() as iss, verifier(iss, session, monotonic=mono) as v:
        old = iss.mint()
        await v.verify(old)
        assert (v.fetches, iss.jwks_requests) == (1, 1)
        new_kid = iss.rotate("RS256", keep=False)
        new = iss.mint()
        assert jwt.get_unverified_header(new)["kid"] == new_kid
        await v.verify(new)
        await v.verify(iss.mint())
        assert (v.fetches, iss.jwks_requests) == (2, 2)
        # The old key is gone from the set: its token, though verified and cached
        # before, is refused (the refetch just happened, so no new one).
        assert await refused(v, old) == "unknown key id"
        assert v.fetches == 2


async def test_a_burst_of_unknown_kids_costs_at_most_one_fetch_per_30_s(session: aiohttp.ClientSession) -> None:
    mono = Clock(1000.0)
    async with Issuer() as iss, verifier(iss, session, monotonic=mono) as v:
        good = iss.mint()
        tokens = [iss.mint(kid=f"forged-{n}") for n in range(100)]
        results = await asyncio.gather(*(v.verify(t) for t in tokens), v.verify(good), return_exceptions=True)
        assert all(isinstance(r, TokenError) and r.description == "unknown key id" for r in results[:-1])
        assert isinstance(results[-1], Claims)
        assert v.fetches <= 2 and iss.jwks_requests == v.fetches  # the start-up fetch and at most one refetch
        fetched = v.fetches
        mono.t += 29
        await refused(v, iss.mint(kid="forged-again"))
        assert v.fetches == fetched
        mono.t += 2  # 31 s after the refetch: one more is allowed
        await asyncio.gather(*(refused(v, iss.mint(kid=f"later-{n}")) for n in range(20)))
        assert v.fetches == fetched + 1


async def test_verified_tokens_are_cached_until_exp(iss: Issuer, session: aiohttp.ClientSession) -> None:
    clock = Clock(time.time())
    async with verifier(iss, session, clock=clock) as v:
        token = iss.mint(exp=int(clock.t) + 100)
        first = await v.verify(token)
        assert await v.verify(token) is first  # the cache answered
        clock.t += 100 + 59
        assert await v.verify(token) is first  # within the leeway
        clock.t += 2
        assert await refused(v, token) == "the token has expired"
    async with verifier(iss, session, cache_size=0) as v:
        token = iss.mint()
        assert await v.verify(token) is not await v.verify(token)
    async with verifier(iss, session, cache_size=3) as v:
        for n in range(10):
            await v.verify(iss.mint(jti=f"t{n}"))
        assert len(v._cache) == 3


# -- the JWKS: Cache-Control, discovery, the issuer going down ----------------


def test_cache_ttl_is_max_age_bounded_to_5_min_24_h() -> None:
    assert cache_ttl("public, max-age=600") == 600
    assert cache_ttl("max-age=60") == 300
    assert cache_ttl("max-age=864000, must-revalidate") == 86400
    assert cache_ttl('max-age="900"') == 900
    assert cache_ttl(None) == 300
    assert cache_ttl("public") == 300
    assert cache_ttl("no-store") == 300
    assert cache_ttl("no-cache, max-age=3600") == 300
    assert cache_ttl("max-age=banana") == 300
    assert cache_ttl("max-age=3600", "600") == 3000
    assert cache_ttl("max-age=3600", "3500") == 300


@pytest.mark.parametrize(("max_age", "kept"), [(600, 600), (60, 300), (864000, 86400), (None, 300)])
async def test_max_age_is_honoured_and_bounded(max_age: int | None, kept: float,
                                               session: aiohttp.ClientSession) -> None:
    mono = Clock(1000.0)
    async with Issuer(max_age=max_age, algorithms=("RS256",)) as iss, verifier(iss, session, monotonic=mono) as v:
        mono.t += kept - 1
        await v.verify(iss.mint())
        await asyncio.sleep(0.05)
        assert v.fetches == 1  # still fresh
        mono.t += 2
        await v.verify(iss.mint())  # stale: answered from the set at hand, refreshed behind
        await until(lambda: v.fetches == 2 and iss.jwks_requests == 2)
        await v.verify(iss.mint())
        await asyncio.sleep(0.05)
        assert v.fetches == 2  # fresh again


async def test_discovery_and_explicit_jwks_url(session: aiohttp.ClientSession) -> None:
    async with Issuer() as iss:
        async with verifier(iss, session) as v:
            await v.verify(iss.mint())
        assert (iss.discovery_requests, iss.jwks_requests) == (1, 1)
        async with verifier(iss, session, settings=settings_for(iss, jwks_url=iss.jwks_url)) as v:
            await v.verify(iss.mint(alg="ES256"))
        assert (iss.discovery_requests, iss.jwks_requests) == (1, 2)
        # OIDC Discovery §4.3: the document must be for the configured issuer
        # (a trailing slash is another issuer: discovery strips it, iss does not).
        other = JWTSettings(issuer=iss.issuer + "/", audience="aiwfd")
        async with verifier(iss, session, settings=other, ready=False, backoff=(10.0, 10.0)) as v:
            await until(reason_has(v, "another issuer"))
            assert not v.ready


async def test_issuer_down_cached_keys_keep_serving(session: aiohttp.ClientSession) -> None:
    mono = Clock(1000.0)
    async with Issuer() as iss, verifier(iss, session, monotonic=mono, backoff=(0.01, 0.05)) as v:
        await v.verify(iss.mint())
        for refuse in (False, True):
            await iss.down(refuse=refuse)
            await v.verify(iss.mint(jti=f"fresh-{refuse}"))  # a new token: the key set, not the token cache
            await v.verify(iss.mint(alg="ES256"))
            mono.t += 100_000  # far past the set's life: a refresh is tried, fails, the set stays
            tried = v.attempts + 1
            await v.verify(iss.mint(jti=f"late-{refuse}"))
            await until(attempted(v, tried))
            await v.verify(iss.mint(jti=f"later-{refuse}"))
            assert v.ready and v.reason is None
            assert await refused(v, iss.mint(kid="new-kid")) == "unknown key id"
            await iss.up()


async def test_a_broken_key_set_is_refused_and_the_last_good_one_kept(session: aiohttp.ClientSession) -> None:
    mono = Clock(1000.0)
    async with Issuer() as iss:
        bodies = {
            b"<html>sorry</html>": "the answer is not JSON",
            b"[1, 2]": "the answer is not a JSON object",
            b'{"keys": []}': "no usable signing keys",
            b'{"keys": {"kty": "RSA"}}': "no usable signing keys",
            json.dumps({"keys": [{**k, "use": "enc"} for k in iss.jwks()["keys"]]}).encode(): "no usable signing keys",
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hs"}]}).encode(): "no usable signing keys",
            b"[" * 100_000: "RecursionError",
        }
        for body, cause in bodies.items():
            iss.jwks_body = body
            async with verifier(iss, session, ready=False, backoff=(10.0, 10.0)) as v:
                await until(reason_has(v, cause))
                with pytest.raises(KeysUnavailable):
                    await v.verify(iss.mint())
        iss.jwks_body = None
        async with verifier(iss, session, monotonic=mono) as v:
            token = iss.mint()
            await v.verify(token)
            iss.jwks_body = b'{"keys": []}'
            mono.t += 100_000
            await v.verify(iss.mint(jti="a"))
            await until(lambda: v.attempts == 2)
            await v.verify(iss.mint(jti="b"))
            assert v.ready


async def test_issuer_down_at_start_up(session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for refuse, cause in ((True, "cannot connect"), (False, "HTTP 503")):
        async with Issuer() as iss:
            await iss.down(refuse=refuse)
            token = iss.mint()
            started = time.monotonic()
            async with verifier(iss, session, ready=False, backoff=(0.01, 0.05)) as v:
                assert time.monotonic() - started < 0.5  # start() does not wait for the issuer
                assert not v.ready
                with pytest.raises(KeysUnavailable):
                    await v.verify(token)
                await until(reason_has(v, cause))
                assert (v.reason or "").startswith("the issuer's keys are not loaded yet: ")
                assert not v.ready
                await until(lambda: v.attempts >= 3)  # it keeps retrying
                await iss.up()
                await asyncio.wait_for(v.wait_ready(), 5)
                assert v.ready and v.reason is None
                assert (await v.verify(token)).client == "test-client"
            assert token not in caplog.text
    assert "cannot load the issuer's keys" in caplog.text


async def test_the_issuer_as_a_process(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiwfd.testing.issuer", "--port", "0", "--max-age", "900",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"LISTENING ")
        base = f"http://127.0.0.1:{int(line.split()[1])}/realms/test"
        settings = JWTSettings(issuer=base, audience="aiwfd", algorithms=("RS256", "ES256"))
        v = Verifier(settings, session)
        await v.start()
        try:
            await asyncio.wait_for(v.wait_ready(), 5)
            async with session.post(f"{base}/mint", json={"alg": "ES256", "overrides": {"azp": "x"}}) as r:
                token = await r.text()
            assert (await v.verify(token)).client == "test-client"
            async with session.post(f"{base}/rotate", json={"alg": "RS256", "keep": False}) as r:
                assert r.status == 200
            async with session.post(f"{base}/mint", json={}) as r:
                await v.verify(await r.text())
            assert v.fetches == 2
        finally:
            await v.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# -- the fast base64url check of aiwfd.auth.jwt ---------------------------------


SEGMENTS = [b"", b"A", b"AA", b"AAA", b"AAAA", b"AA==", b"AAA=", b"AB==", b"AAB=", b"A===", b"AA=", b"=",
            b"====", b"!!!!", b"a+b/", b"ab cd", b"abc\n", b"e30", b"e30=", b"eyJhbGciOiJSUzI1NiJ9", b"_-_-",
            b"\xc3\xa9AAA", b"AAAAA", b"AAAAAA=="]


def test_the_fast_segment_check_is_pyjwts() -> None:
    import inspect

    from aiwfd.auth.jwt import _FastJWS

    # PyJWT still decodes through the method overridden (else the override is dead code).
    assert "self._decode_base64url_segment(" in inspect.getsource(jwt.PyJWS._load)
    samples = SEGMENTS + [s.encode() for s in "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4In0.c2ln".split(".")]
    rng = random.Random(15)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" + b"==+/ .\n\x00"
    samples += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(13))) for _ in range(5000)]
    for segment in samples:
        try:
            expected: bytes | None = jwt.PyJWS._decode_base64url_segment(segment, "s")
        except jwt.DecodeError:
            expected = None
        try:
            got: bytes | None = _FastJWS._decode_base64url_segment(segment, "s")
        except jwt.DecodeError:
            got = None
        assert got == expected, segment
    assert Verifier(JWTSettings(issuer="https://i", audience="a"), None)._decoder._jws.__class__ is _FastJWS  # type: ignore[arg-type]
