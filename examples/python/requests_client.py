"""Call an aiwfd agent with `requests`.

    AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
        python examples/python/requests_client.py greeter '{"name": "Alice"}'

Prints `data` and the trace on success (exit 0). An error answer of aiwfd
({"error": {"type", "message", "details"}, "request_id"}) is printed to
stderr with exit status 1; no answer at all (connection refused, timeout) is
exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import requests

BASE_URL = os.environ.get("AIWFD_URL", "http://127.0.0.1:8080").rstrip("/")
API_KEY = os.environ.get("AIWFD_API_KEY", "")
# Longer than aiwfd's own deadline (55 s by default), so that its answer,
# even a 504, arrives before the client gives up.
TIMEOUT = 70


class AgentError(Exception):
    """An error answered by aiwfd (or by a proxy in front of it)."""

    def __init__(self, status: int, type_: str, message: str, details: list[Any],
                 request_id: str | None, retry_after: str | None) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message = status, type_, message
        self.details, self.request_id, self.retry_after = details, request_id, retry_after


def call_agent(session: requests.Session, agent: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /agent/{agent}; returns {"data", "trace"} or raises AgentError."""
    headers = {"X-API-Key": API_KEY} if API_KEY else {}
    # json= sends Content-Type: application/json (required when a Content-Type is sent).
    r = session.post(f"{BASE_URL}/agent/{agent}", json=body, headers=headers, timeout=TIMEOUT)
    try:
        doc = r.json()
    except ValueError:
        doc = None
    if r.ok and isinstance(doc, dict) and "data" in doc:
        return doc
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        # Not aiwfd's error shape: e.g. an HTML page from a proxy.
        raise AgentError(r.status_code, "http_error", r.text[:200].strip() or r.reason, [],
                         r.headers.get("X-Request-ID"), r.headers.get("Retry-After"))
    raise AgentError(r.status_code, err.get("type", "unknown"), err.get("message", ""),
                     err.get("details") or [], doc.get("request_id") or r.headers.get("X-Request-ID"),
                     r.headers.get("Retry-After"))


def main(argv: list[str]) -> int:
    agent = argv[1] if len(argv) > 1 else "greeter"
    body = json.loads(argv[2]) if len(argv) > 2 else {"name": "Alice"}
    with requests.Session() as session:
        try:
            result = call_agent(session, agent, body)
        except AgentError as e:
            print(f"error: {e.status} {e.type}: {e.message} (request_id {e.request_id})", file=sys.stderr)
            for d in e.details:
                print(f"  {d.get('path') or '(body)'}: {d.get('message')}", file=sys.stderr)
            if e.retry_after:  # 429 and 503 are worth retrying, after this many seconds
                print(f"  retry after {e.retry_after} s", file=sys.stderr)
            return 1
        except requests.RequestException as e:
            print(f"error: no answer from {BASE_URL}: {e}", file=sys.stderr)
            return 2
    trace = result["trace"]
    print("data:", json.dumps(result["data"], ensure_ascii=False))
    print(f"trace: step_name={trace['step_name']} attempts={trace['attempts']} "
          f"tokens={trace['usage']['total']} duration={trace['duration']} "
          f"model={trace['model']} request_id={trace['request_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
