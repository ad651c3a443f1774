"""The webhook verification snippets of docs/api.md#webhooks (issue 16).

examples/webhooks/verify.py and verify.mjs are what a receiver copies: they
must accept what aiwfd sends (signed here by aiwfd.jobs.webhooks.sign, the
daemon's own signer) and refuse a tampered body, id or signature, a
timestamp more than 5 minutes off, and a secret that did not sign; with two
secrets (a rotation) either one verifies. The code blocks of docs/api.md are
the files, byte for byte, so the guide cannot drift from what is tested.
The JavaScript half needs `node` (skipped without it).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from aiwfd.jobs.webhooks import parse_secrets, sign
from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "webhooks"
VERIFY_PY = EXAMPLES / "verify.py"
VERIFY_MJS = EXAMPLES / "verify.mjs"
API_MD = REPO / "docs" / "api.md"


def new_secret() -> str:
    """As docs/config.md says to make one: "whsec_" + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


OLD, NEW, OTHER = new_secret(), new_secret(), new_secret()
JOB_ID = "3q2RmW9xZ0Kc8bX1yLp4Tg"
MSG_ID = "msg_" + JOB_ID
BODY = json.dumps({
    "type": "job.succeeded",
    "timestamp": "2026-12-01T13:40:57.123Z",
    "data": {"id": JOB_ID, "agent": "greeter", "status": "succeeded", "created_at": "2026-12-01T13:40:55.001Z",
             "started_at": "2026-12-01T13:40:55.010Z", "finished_at": "2026-12-01T13:40:57.123Z",
             "attempts": 1, "result": {"data": {"message": "Grüß dich, Jörg!"}, "trace": {"attempts": 1}},
             "error": None},
}, ensure_ascii=False).encode()


def headers(secrets: list[str], body: bytes = BODY, *, ts: int | None = None, msg_id: str = MSG_ID) -> dict[str, str]:
    """What aiwfd sends: the secrets as AIWF_WEBHOOK_SECRET holds them, parsed and signed by the daemon's code."""
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(parse_secrets(",".join(secrets)), msg_id, ts, body)}


@dataclass
class Case:
    name: str
    secret: str
    headers: dict[str, str]
    body: bytes
    accepted: bool


def cases() -> list[Case]:
    now = int(time.time())
    good = headers([OLD])
    rotated = headers([OLD, NEW])
    sig = good["webhook-signature"]
    tampered = BODY.replace(b"greeter", b"greetor")
    assert tampered != BODY
    return [
        Case("accepts what aiwfd signs", OLD, good, BODY, True),
        Case("accepts a timestamp 2 min old", OLD, headers([OLD], ts=now - 120), BODY, True),
        Case("refuses a tampered body", OLD, good, tampered, False),
        Case("refuses a body with a byte added", OLD, good, BODY + b" ", False),
        Case("refuses another webhook-id", OLD, {**good, "webhook-id": "msg_other"}, BODY, False),
        Case("refuses another timestamp than signed", OLD, {**good, "webhook-timestamp": str(now - 1)}, BODY, False),
        Case("refuses a timestamp 10 min old", OLD, headers([OLD], ts=now - 600), BODY, False),
        Case("refuses a timestamp 10 min ahead", OLD, headers([OLD], ts=now + 600), BODY, False),
        Case("refuses a non-numeric timestamp", OLD, {**good, "webhook-timestamp": "2026-12-01T13:40:57Z"}, BODY,
             False),
        Case("refuses another secret", OTHER, good, BODY, False),
        Case("rotation: the old secret verifies", OLD, rotated, BODY, True),
        Case("rotation: the new secret verifies", NEW, rotated, BODY, True),
        Case("rotation: a third secret does not", OTHER, rotated, BODY, False),
        Case("refuses a signature of another version", OLD, {**good, "webhook-signature": "v2," + sig[3:]}, BODY,
             False),
        Case("refuses a truncated signature", OLD, {**good, "webhook-signature": sig[:-4]}, BODY, False),
        Case("refuses a signature without its version", OLD, {**good, "webhook-signature": sig[3:]}, BODY, False),
        Case("refuses an empty signature", OLD, {**good, "webhook-signature": ""}, BODY, False),
        Case("refuses missing headers", OLD, {}, BODY, False),
    ]


def test_the_rotation_case_has_two_signatures() -> None:
    """Not vacuous: with two secrets aiwfd sends two space-separated v1 signatures."""
    sigs = headers([OLD, NEW])["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs) and sigs[0] != sigs[1]


# --------------------------------------------------------------------------- Python


def load_python() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_webhook_verify", VERIFY_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_python_snippet(case: Case) -> None:
    assert load_python().verify(case.secret, case.headers, case.body) is case.accepted


def test_python_snippet_takes_case_insensitive_headers() -> None:
    """A framework's header mapping (here aiohttp's, as an aiohttp receiver has it) works as it is."""
    from multidict import CIMultiDict

    sent = CIMultiDict((k.title(), v) for k, v in headers([OLD]).items())
    assert "webhook-id" not in dict(sent)
    assert load_python().verify(OLD, sent, BODY) is True


# --------------------------------------------------------------------------- JavaScript

NODE = shutil.which("node")

# Every case through verify.mjs, once with a plain object (Node's req.headers)
# and once with a fetch Headers object; one node process for all of them.
HARNESS = """
import { verify } from %s;
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const out = JSON.parse(Buffer.concat(chunks)).map((c) => {
  const body = Buffer.from(c.body, "base64");
  return [verify(c.secret, c.headers, body), verify(c.secret, new Headers(c.headers), body)];
});
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_javascript_snippet() -> None:
    all_cases = cases()
    payload = [{"secret": c.secret, "headers": c.headers, "body": base64.b64encode(c.body).decode()}
               for c in all_cases]
    assert NODE is not None
    proc = subprocess.run(
        [NODE, "--input-type=module", "-e", HARNESS % json.dumps(VERIFY_MJS.as_uri())],
        input=json.dumps(payload).encode(), capture_output=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    results: list[Any] = json.loads(proc.stdout)
    wrong = [f"{c.name}: plain object {r[0]}, Headers {r[1]}, expected {c.accepted}"
             for c, r in zip(all_cases, results, strict=True) if r != [c.accepted, c.accepted]]
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- the guide shows the files


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, content) of each fenced block, at the left margin."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\S*)\n(.*?)^```$", text, re.M | re.S)]


def webhooks_section() -> str:
    text = API_MD.read_text(encoding="utf-8")
    start = text.index("\n## Webhooks\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


@pytest.mark.parametrize("lang,path", [("python", VERIFY_PY), ("js", VERIFY_MJS)], ids=["python", "js"])
def test_the_guide_shows_the_file(lang: str, path: Any) -> None:
    section = webhooks_section()
    blocks = [body for info, body in fenced_blocks(section) if info == lang]
    assert len(blocks) == 1, f"docs/api.md#webhooks should have one ```{lang} block, has {len(blocks)}"
    assert blocks[0] == path.read_text(encoding="utf-8"), \
        f"the ```{lang} block of docs/api.md#webhooks is not {path.relative_to(REPO)}: copy the file into it"
    assert f"(../{path.relative_to(REPO)})" in section, f"docs/api.md#webhooks does not link {path.name}"
