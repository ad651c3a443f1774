"""JWT bearer tokens through the server (SPEC §8.1), against a real OIDC issuer on loopback.

The verifier itself (rotation, refetch limits, caching) is tests/http/test_jwt.py;
this module checks what a client sees: 200s with the token's client, 401 with
the RFC 6750 / RFC 9728 challenge, 403 for a missing scope, 503 and an unready
/health/ready while the issuer's keys have not loaded, and API keys beside tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.issuer import Issuer
from aiwfd.testing.metrics import delta

KEY = "an-api-key-beside-tokens"
BODY = {"name": "Ada"}

CONFIG = """
version: 0.3
auth:
  jwt:
    issuer: {issuer}
    audience: aiwfd
    algorithms: [RS256, ES256]
    client_claim: azp
    scope_prefix: "aiwfd:"
    limits: {{requests: 1000/min}}
types:
  In: {{name: string}}
  Out: {{message: string}}
assistants:
  greeter: {{model: gpt-4o-mini, input_type: In, output_type: Out}}
  other: {{model: gpt-4o-mini, input_type: In, output_type: Out}}
"""


@pytest.fixture(scope="module")
async def issuer() -> AsyncIterator[Issuer]:
    async with Issuer() as iss:
        yield iss


@pytest.fixture(scope="module")
async def srv(issuer: Issuer, fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcess]:
    directory = tmp_path_factory.mktemp("jwt")
    path = write_config(directory, CONFIG.format(issuer=issuer.issuer))
    async with serve(path, env=fake_env(fake, API_KEY=KEY), state_dir=str(directory / "state")) as s:
        verifier = s.server.runtime.snapshot.verifier
        assert verifier is not None
        await verifier.wait_ready()
        yield s


async def call(srv: InProcess, token: str | None, agent: str = "greeter") -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with srv.session.post(srv.url(f"/agent/{agent}"), json=BODY, headers=headers) as r:
        return r.status, dict(r.headers), json.loads(await r.text())


def flip_signature(token: str) -> str:
    head, body, sig = token.split(".")
    middle = len(sig) // 2
    return f"{head}.{body}.{sig[:middle]}{'A' if sig[middle] != 'A' else 'B'}{sig[middle + 1:]}"


def metadata_url(srv: InProcess) -> str:
    return f"{srv.base}/.well-known/oauth-protected-resource"


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_valid_token_is_its_client(srv: InProcess, issuer: Issuer, alg: str) -> None:
    before = await srv.scrape()
    status, headers, doc = await call(srv, issuer.mint(alg=alg, azp=f"app-{alg}"))
    assert status == 200, doc
    assert f" client=app-{alg} attempts=1" in srv.log_lines()[-1]
    assert delta(before, await srv.scrape(), "aiwfd_agent_calls_total", agent="greeter", outcome="ok",
                 client="jwt") == 1
    # auth.jwt.limits applies per client.
    assert headers["RateLimit-Policy"] == '"client";q=1000;w=60'


@pytest.mark.parametrize("case", ["expired", "not yet valid", "wrong iss", "wrong aud", "bad signature",
                                  "alg none", "HS256 with the public key", "unknown kid"])
async def test_a_bad_token_is_401_with_the_challenge(srv: InProcess, issuer: Issuer, case: str) -> None:
    now = int(time.time())
    token = {
        "expired": lambda: issuer.mint(exp=now - 120),
        "not yet valid": lambda: issuer.mint(nbf=now + 600),
        "wrong iss": lambda: issuer.mint(iss="http://127.0.0.1:1/elsewhere"),
        "wrong aud": lambda: issuer.mint(aud="someone-else"),
        "bad signature": lambda: flip_signature(issuer.mint()),
        "alg none": lambda: issuer.mint(alg="none"),
        "HS256 with the public key": lambda: issuer.mint(alg="HS256"),
        "unknown kid": lambda: issuer.mint(kid="no-such-kid"),
    }[case]()
    status, headers, doc = await call(srv, token)
    assert status == 401, (case, doc)
    assert doc["error"]["type"] == "unauthorized" and doc["error"]["message"].startswith("invalid token: ")
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer resource_metadata="{metadata_url(srv)}", error="invalid_token", '
                                'error_description="'), challenge
    assert token not in challenge and token not in json.dumps(doc)
    assert token.split(".")[1] not in "\n".join(srv.log_lines())


async def test_no_credentials_point_to_the_resource_metadata(srv: InProcess) -> None:
    status, headers, _ = await call(srv, None)
    assert status == 401
    assert headers["WWW-Authenticate"] == f'Bearer resource_metadata="{metadata_url(srv)}"'
    async with srv.session.get(metadata_url(srv)) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["resource"] == srv.base
    assert doc["authorization_servers"] == [srv.server.runtime.snapshot.compiled.config.auth.jwt.issuer]  # type: ignore[union-attr]
    assert "aiwfd:greeter" in doc["scopes_supported"] and "aiwfd:*" in doc["scopes_supported"]


async def test_a_token_without_the_agent_scope_is_403(srv: InProcess, issuer: Issuer) -> None:
    token = issuer.mint(scope="openid aiwfd:greeter")
    assert (await call(srv, token))[0] == 200
    status, headers, doc = await call(srv, token, agent="other")
    assert status == 403 and doc["error"]["type"] == "forbidden"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert "aiwfd:other" in doc["error"]["message"]
    assert (await call(srv, issuer.mint(scope="openid")))[0] == 403


async def test_api_keys_work_beside_tokens(srv: InProcess) -> None:
    async with srv.session.post(srv.url("/agent/other"), json=BODY, headers={"X-API-Key": KEY}) as r:
        assert r.status == 200
    assert " client=api-key-1 " in srv.log_lines()[-1]


async def test_an_issuer_down_at_start_up(fake: FakeOpenAI, tmp_path: Path) -> None:
    """aiwfd starts anyway; token calls are 503 and /health/ready says why until the keys load."""
    async with Issuer() as iss:
        await iss.down()
        path = write_config(tmp_path, CONFIG.format(issuer=iss.issuer))
        async with serve(path, env=fake_env(fake, API_KEY=KEY)) as s:
            status, headers, doc = await call(s, iss.mint())
            assert status == 503 and doc["error"]["type"] == "unavailable", doc
            assert headers["Retry-After"]
            async with s.session.get(s.url("/health/ready")) as r:
                assert r.status == 503
                ready = await r.json()
            assert ready["status"] == "unready" and "keys" in ready["reason"]
            async with s.session.get(s.url("/health")) as r:
                assert r.status == 200  # liveness is not readiness
            # API keys do not wait for the issuer.
            async with s.session.post(s.url("/agent/greeter"), json=BODY, headers={"X-API-Key": KEY}) as r:
                assert r.status == 200
            await iss.up()
            verifier = s.server.runtime.snapshot.verifier
            assert verifier is not None
            await verifier.wait_ready()
            assert (await call(s, iss.mint()))[0] == 200
            async with s.session.get(s.url("/health/ready")) as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"


async def test_a_token_naming_a_key_client_is_not_that_client(srv: InProcess, issuer: Issuer, fake: FakeOpenAI) -> None:
    """A token's client claim is the caller's to choose: one that says `api-key-1` gets
    neither that key client's idempotent answers nor its counters."""
    fake.reset()
    headers = {"X-API-Key": KEY, "Idempotency-Key": "shared-key-1"}
    async with srv.session.post(srv.url("/agent/greeter"), json=BODY, headers=headers) as r:
        assert r.status == 200
    token = issuer.mint(azp="api-key-1")
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "shared-key-1"}
    async with srv.session.post(srv.url("/agent/greeter"), json=BODY, headers=headers) as r:
        assert r.status == 200 and "Idempotency-Replayed" not in r.headers
    assert fake.calls == 2  # both ran
    assert " client=api-key-1 " in srv.log_lines()[-1]  # the log still shows the claim


async def test_a_client_claim_cannot_forge_log_lines(srv: InProcess, issuer: Issuer) -> None:
    evil = 'evil status=200 request_id=forged\n2026-01-01T00:00:00Z POST /agent/x - 1ms status=200'
    status, _, _ = await call(srv, issuer.mint(azp=evil))
    assert status == 200
    last = srv.log_lines()[-1]
    assert "client=evil\\x20status=200\\x20request_id=forged\\x0a2026" in last
    assert not any(line.startswith("2026-01-01T00:00:00Z") for line in srv.log_lines())


async def test_a_reload_of_the_limits_keeps_the_issuers_keys(fake: FakeOpenAI, tmp_path: Path) -> None:
    """Only what verifies a token makes a new verifier: a reload that changes
    auth.jwt.limits keeps the loaded keys, so tokens pass with the issuer down."""
    async with Issuer() as iss:
        path = write_config(tmp_path, CONFIG.format(issuer=iss.issuer))
        async with serve(path, env=fake_env(fake, API_KEY=KEY)) as s:
            verifier = s.server.runtime.snapshot.verifier
            assert verifier is not None
            await verifier.wait_ready()
            await iss.down()
            path.write_text(CONFIG.format(issuer=iss.issuer).replace("1000/min", "2000/min"), encoding="utf-8")
            assert await s.server.reload()
            assert s.server.runtime.snapshot.verifier is verifier
            status, headers, _ = await call(s, iss.mint())
            assert status == 200 and headers["RateLimit-Policy"] == '"client";q=2000;w=60'
