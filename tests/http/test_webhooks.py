"""Webhook signing and one-attempt delivery (SPEC §9.3, issue 16 item 4),
against a real receiver on 127.0.0.1 that verifies with `standardwebhooks`.

The retry loop here is the test's own: it calls `deliver` once per attempt
and skips the outcome's delay (asserted, not slept), as the delivery task on
the job store will wait it.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from aiwfd.jobs import webhooks
from aiwfd.jobs.webhooks import (
    BACKOFF_CAP,
    DEFAULT_TIMEOUT,
    GuardedResolver,
    Outcome,
    TargetRefused,
    TargetUnresolvable,
    backoff,
    check_target,
    deliver,
    open_session,
    parse_secrets,
    retry_after,
    should_give_up,
    sign,
)
from aiwfd.testing.webhook_receiver import Answer, Hang, Redirect, WebhookReceiver


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


SECRET = new_secret()
OLD_SECRET = new_secret()


def event(n: int = 1) -> dict[str, Any]:
    return {
        "type": "job.succeeded",
        "timestamp": "2026-12-01T13:00:00Z",
        "data": {"id": f"job_{n}", "status": "succeeded", "result": {"data": {"text": "héllo"}, "trace": {}}},
    }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def rx() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver([SECRET]) as r:
        yield r


async def attempt(session: aiohttp.ClientSession, url: str, n: int = 1, msg_id: str = "msg_1",
                  secrets: tuple[str, ...] = (SECRET,), **kw: Any) -> Outcome:
    kw.setdefault("allow_private", True)  # the receiver is on loopback
    return await deliver(session, url, event(), msg_id, secrets, attempt=n, **kw)


# --------------------------------------------------------------------------
# Signatures


async def test_delivery_is_verified_by_standardwebhooks(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    before = int(time.time())
    out = await attempt(session, rx.url)
    assert out == Outcome("delivered", 200, None, "delivered (200)") and out.done
    [d] = rx.deliveries
    assert d.verified and d.verified_by == (0,)
    assert d.msg_id == "msg_1" and d.content_type == "application/json"
    assert d.json() == event()  # the event as given, nothing added
    # Unix seconds, UTC: what the reference verifier reads (with tz=utc), within its 5 min tolerance.
    assert d.timestamp is not None and before <= int(d.timestamp) <= int(time.time())
    assert d.signature is not None and d.signature.startswith("v1,") and " " not in d.signature
    # A receiver with another secret refuses it: the signature depends on the key.
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(d.body, d.headers)


def test_sign_matches_the_reference_signer() -> None:
    body = b'{"type":"job.failed"}'
    ts = 1_764_590_400
    # The reference signer takes a datetime and reads it as UTC whatever its
    # zone (issue 16): hand it a UTC one, or it signs another timestamp.
    ref = Webhook(SECRET).sign("msg_x", datetime.fromtimestamp(ts, tz=timezone.utc), body.decode())
    assert sign([SECRET], "msg_x", ts, body) == ref
    # Unpadded base64 is the same key (the reference verifier pads it too).
    unpadded = "whsec_" + base64.b64encode(b"k" * 25).decode().rstrip("=")
    assert sign([unpadded], "m", ts, body) == Webhook(unpadded).sign("m", datetime.fromtimestamp(ts, tz=timezone.utc),
                                                                     body.decode())


async def test_rotation_two_signatures_each_verifies(session: aiohttp.ClientSession) -> None:
    secrets = parse_secrets(f"{SECRET}, {OLD_SECRET}")
    assert secrets == (SECRET, OLD_SECRET)
    async with WebhookReceiver([SECRET, OLD_SECRET]) as rx:
        assert (await attempt(session, rx.url, secrets=secrets)).kind == "delivered"
        [d] = rx.deliveries
    assert d.signature is not None
    sigs = d.signature.split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    # A receiver holding only the new or only the old secret verifies the same delivery...
    assert d.verified_by == (0, 1)
    # ...each through its own signature.
    for secret, sig in zip(secrets, sigs, strict=True):
        Webhook(secret).verify(d.body, {**d.headers, "webhook-signature": sig}, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD_SECRET).verify(d.body, {**d.headers, "webhook-signature": sigs[0]}, json_parse=False)


async def test_receiver_counts_a_malformed_header_as_unverified(session: aiohttp.ClientSession,
                                                                rx: WebhookReceiver) -> None:
    # The reference verifier raises a bare ValueError on "v1" without a comma;
    # the receiver must record that as unverified, not answer 500.
    headers = {"webhook-id": "m", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1"}
    async with session.post(rx.url, data=b"{}", headers=headers) as resp:
        assert resp.status == 200
    assert rx.deliveries[0].verified is False
    with pytest.raises(ValueError):
        Webhook(SECRET).verify(b"{}", headers)


@pytest.mark.parametrize("text, complaint", [
    ("", "no webhook secret"),
    ("c2VjcmV0LXdpdGhvdXQtcHJlZml4", 'does not start with "whsec_"'),
    ("whsec_not*base64!", "not valid base64"),
    ("whsec_", "empty"),
    (f"{SECRET},", "secret 2 is empty"),
    (f"{SECRET},whsec_%%%%", "secret 2 is not valid base64"),
])
def test_parse_secrets_refuses_without_quoting(text: str, complaint: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_secrets(text)
    msg = str(e.value)
    assert complaint in msg
    for part in text.split(","):
        body = part.strip().removeprefix("whsec_")
        assert not body or body not in msg, msg


def test_secrets_never_in_messages() -> None:
    bad = "whsec_" + "A" * 31 + "!"  # a long, nearly valid secret
    for call in (lambda: sign([bad], "m", 1, b""), lambda: parse_secrets(f"{SECRET},{bad}")):
        with pytest.raises(ValueError) as e:
            call()
        assert "A" * 8 not in str(e.value) and SECRET[6:] not in str(e.value)


# --------------------------------------------------------------------------
# Retries


async def test_fails_three_times_then_delivered_on_the_fourth(session: aiohttp.ClientSession,
                                                              rx: WebhookReceiver) -> None:
    rx.script(Answer(500), Answer(503), Answer(404), Answer(200))
    outcomes = []
    n = 0
    while True:
        n += 1
        out = await attempt(session, rx.url, n, msg_id="msg_retry", jitter=lambda: 0.5)
        outcomes.append(out)
        if out.done:
            break
        assert out.delay == backoff(n, 0.5)  # the test does not wait it; the delivery task would
    assert [o.kind for o in outcomes] == ["retry"] * 3 + ["delivered"]
    assert [o.status for o in outcomes] == [500, 503, 404, 200]
    assert [o.delay for o in outcomes[:3]] == [1.0, 2.0, 4.0]
    assert n == 4 and len(rx.deliveries) == 4
    # The same webhook-id on every attempt; each one signed (and verified) afresh.
    assert {d.msg_id for d in rx.deliveries} == {"msg_retry"} and len(rx.by_id("msg_retry")) == 4
    assert all(d.verified for d in rx.deliveries)
    assert len({d.body for d in rx.deliveries}) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_honoured(session: aiohttp.ClientSession, rx: WebhookReceiver,
                                               status: int) -> None:
    rx.script(Answer(status, retry_after="7"))
    out = await attempt(session, rx.url, 5)  # backoff would say ~16 s
    assert (out.kind, out.status, out.delay) == ("retry", status, 7.0)
    assert "Retry-After 7 s" in out.reason


async def test_retry_after_http_date_is_honoured(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    now = 1_800_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 120, tz=timezone.utc), usegmt=True)
    rx.script(Answer(503, retry_after=date))
    out = await attempt(session, rx.url, clock=lambda: now)
    assert (out.kind, out.delay) == ("retry", 120.0)
    # Unreadable: the backoff applies.
    rx.script(Answer(503, retry_after="soon"))
    out = await attempt(session, rx.url, 3, jitter=lambda: 0.0)
    assert out.delay == backoff(3, 0.0) == 3.0


def test_retry_after_parsing() -> None:
    now = 1_800_000_000.0
    assert retry_after(None, now) is None
    assert retry_after("0", now) == 0.0
    assert retry_after(" 30 ", now) == 30.0
    assert retry_after("999999999", now) == BACKOFF_CAP
    assert retry_after("-5", now) is None
    assert retry_after("1.5", now) is None
    past = format_datetime(datetime.fromtimestamp(now - 60, tz=timezone.utc), usegmt=True)
    assert retry_after(past, now) == 0.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 10) == 10.0


async def test_410_stops(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    rx.script(Answer(410))
    out = await attempt(session, rx.url)
    assert (out.kind, out.status, out.done) == ("gone", 410, True)


async def test_a_hanging_receiver_times_out(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    assert DEFAULT_TIMEOUT == 10.0
    assert inspect.signature(deliver).parameters["timeout"].default == 10.0
    rx.script(Hang())
    started = time.monotonic()
    out = await attempt(session, rx.url, timeout=0.3, jitter=lambda: 0.0)
    elapsed = time.monotonic() - started
    assert (out.kind, out.status, out.delay) == ("retry", None, 0.75)
    assert "timed out after 0.3 s" in out.reason
    assert 0.25 <= elapsed < 2.0
    assert len(rx.deliveries) == 1  # it arrived; only the answer never came


async def test_a_redirect_is_not_followed(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    for status in (301, 302, 307, 308):
        rx.script(Redirect(status=status))
        out = await attempt(session, rx.url)
        assert (out.kind, out.status) == ("retry", status) and "redirect not followed" in out.reason
    assert [d.path for d in rx.deliveries] == ["/hook"] * 4  # /elsewhere never asked


async def test_network_error_retries(session: aiohttp.ClientSession) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await attempt(session, f"http://127.0.0.1:{port}/hook", 2, jitter=lambda: 1.0)
    assert (out.kind, out.status, out.delay) == ("retry", None, 2.5)
    assert out.reason.startswith("network error (") and str(port) not in out.reason


def test_backoff_schedule() -> None:
    assert [backoff(n, 0.5) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]
    assert backoff(1, 0.0) == 0.75 and backoff(1, 1.0) == 1.25
    assert backoff(13, 0.9) == backoff(40, 0.9) == BACKOFF_CAP == 3600.0
    assert 3000 < backoff(40, 0.0) < BACKOFF_CAP  # still spread near the cap
    assert backoff(10_000, 0.99) == BACKOFF_CAP  # no overflow
    with pytest.raises(ValueError):
        backoff(0, 0.5)
    with pytest.raises(ValueError):
        backoff(1, 2.0)


def test_should_give_up() -> None:
    t0 = 1_000_000.0
    assert not should_give_up(t0, t0)
    assert not should_give_up(t0, t0 + 24 * 3600 - 1)
    assert should_give_up(t0, t0 + 24 * 3600)
    assert should_give_up(t0, t0 + 61, retry_for=60)
    assert webhooks.RETRY_FOR == 24 * 3600


# --------------------------------------------------------------------------
# SSRF


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.1.2.3:8080/", "http://[::1]/", "http://10.1.2.3/",
    "https://192.168.0.10/x", "http://172.16.5.4/", "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/", "http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://100.64.0.1/", "http://[::ffff:127.0.0.1]/", "http://[fd00::1]/", "http://localhost:9/hook",
    "http://2130706433/", "http://0x7f.0.0.1/", "http://LOCALHOST/",
])
async def test_private_targets_are_refused(url: str) -> None:
    with pytest.raises(TargetRefused) as e:
        await check_target(url, allow_private=False)
    assert "allow_private" in str(e.value)
    assert "/hook" not in str(e.value) and "meta-data" not in str(e.value)
    await check_target(url, allow_private=True)  # a sidecar, the tests


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "example.com/hook",
                                 "http:///nohost", "unix:/run/x.sock"])
async def test_other_schemes_are_refused_even_when_private_is_allowed(url: str) -> None:
    for allow in (False, True):
        with pytest.raises(TargetRefused):
            await check_target(url, allow_private=allow)


async def test_every_resolved_address_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    answers = {
        "public.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        "mixed.example": ["93.184.215.14", "10.0.0.7"],
        "rebind.example": ["fe80::1%eth0"],
    }
    asked: list[str] = []

    async def getaddrinfo(host: str, port: Any, **kw: Any) -> list[Any]:
        asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    await check_target("https://public.example/hook", allow_private=False)
    with pytest.raises(TargetRefused, match=r"'mixed.example' resolves to a private address \(10.0.0.7\)"):
        await check_target("https://mixed.example/hook", allow_private=False)
    with pytest.raises(TargetRefused, match="link-local"):
        await check_target("https://rebind.example/hook", allow_private=False)
    with pytest.raises(TargetUnresolvable):
        await check_target("https://nowhere.example/hook", allow_private=False)
    # Resolved through the loop (a thread), never a blocking call on it.
    assert asked == ["public.example", "mixed.example", "rebind.example", "nowhere.example"]


class FixedResolver(AbstractResolver):
    """Every name resolves to `address`: DNS as an attacker who owns the name serves it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=self.address, port=port, family=socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST)]

    async def close(self) -> None:
        pass


async def test_dns_rebinding_is_refused_at_connect(rx: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    # check_target's look says public; the connection's look says loopback.
    async def public(host: str, port: Any, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", public)
    url = f"http://rebind.example:{rx.port}/hook"
    resolver = FixedResolver("127.0.0.1")
    async with open_session(False, resolver=resolver) as guarded:
        out = await attempt(guarded, url, allow_private=False)
    assert (out.kind, out.done) == ("failed", True) and "loopback" in out.reason and "when connecting" in out.reason
    assert resolver.asked == ["rebind.example"] and rx.deliveries == []
    # allow_private: the same name connects (the resolver is the one given).
    async with open_session(True, resolver=FixedResolver("127.0.0.1")) as plain:
        assert (await attempt(plain, url, allow_private=True)).kind == "delivered"
    assert [d.verified for d in rx.deliveries] == [True]
    # A public answer passes the guard unchanged.
    [r] = await GuardedResolver(FixedResolver("93.184.215.14")).resolve("public.example", 443)
    assert r["host"] == "93.184.215.14"


async def test_deliver_refuses_a_loopback_target(session: aiohttp.ClientSession, rx: WebhookReceiver) -> None:
    for url in (rx.url, rx.url.replace("127.0.0.1", "localhost")):
        out = await attempt(session, url, allow_private=False)
        assert (out.kind, out.status, out.done) == ("failed", None, True)
        assert "loopback" in out.reason
    assert rx.deliveries == []  # nothing was sent
    assert (await attempt(session, rx.url, allow_private=True)).kind == "delivered"


async def test_nothing_secret_in_logs_or_outcomes(session: aiohttp.ClientSession, rx: WebhookReceiver,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rx.script(Answer(500), Hang())
    reasons = [(await attempt(session, rx.url + "?token=hush", timeout=0.3)).reason for _ in range(2)]
    reasons.append((await attempt(session, "http://10.9.9.9/x?token=hush", allow_private=False)).reason)
    text = caplog.text + " ".join(reasons)
    for needle in (SECRET, SECRET[6:], "héllo", "job_1", "hush"):
        assert needle not in text
