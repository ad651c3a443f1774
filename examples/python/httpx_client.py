"""Call an aiwfd agent with `httpx` (async).

    AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
        python examples/python/httpx_client.py greeter '{"name": "Alice"}'

Works with `httpx` and with its successor `httpx2` (the one the openai SDK
installs), whichever is there. Prints `data` and the trace on success (exit
0). An error answer of aiwfd ({"error": {"type", "message", "details"},
"request_id"}) is printed to stderr with exit status 1; no answer at all
(connection refused, timeout) is exit status 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

try:
    import httpx
except ImportError:  # pragma: no cover - depends on what is installed
    import httpx2 as httpx  # type: ignore[no-redef]

BASE_URL = os.environ.get("AIWFD_URL", "http://127.0.0.1:8080").rstrip("/")
API_KEY = os.environ.get("AIWFD_API_KEY", "")
# Longer than aiwfd's own deadline (55 s by default), so that its answer,
# even a 504, arrives before the client gives up.
TIMEOUT = httpx.Timeout(70.0, connect=5.0)


class AgentError(Exception):
    """An error answered by aiwfd (or by a proxy in front of it)."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.retry_after = response.headers.get("Retry-After")
        try:
            doc = response.json()
        except ValueError:
            doc = None
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            self.type = err.get("type", "unknown")
            self.message = err.get("message", "")
            self.details: list[Any] = err.get("details") or []
            self.request_id = doc.get("request_id")
        else:  # not aiwfd's error shape: e.g. an HTML page from a proxy
            self.type, self.message, self.details = "http_error", response.text[:200].strip(), []
            self.request_id = response.headers.get("X-Request-ID")
        super().__init__(f"{self.status} {self.type}: {self.message}")


async def call_agent(client: httpx.AsyncClient, agent: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST /agent/{agent}; returns {"data", "trace"} or raises AgentError."""
    # json= sends Content-Type: application/json (required when a Content-Type is sent).
    r = await client.post(f"/agent/{agent}", json=body)
    if r.is_success:
        return r.json()
    raise AgentError(r)


async def main(argv: list[str]) -> int:
    agent = argv[1] if len(argv) > 1 else "greeter"
    body = json.loads(argv[2]) if len(argv) > 2 else {"name": "Alice"}
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    # One client for the life of the program: it keeps connections alive.
    async with httpx.AsyncClient(base_url=BASE_URL, headers=headers, timeout=TIMEOUT) as client:
        try:
            result = await call_agent(client, agent, body)
        except AgentError as e:
            print(f"error: {e.status} {e.type}: {e.message} (request_id {e.request_id})", file=sys.stderr)
            for d in e.details:
                print(f"  {d.get('path') or '(body)'}: {d.get('message')}", file=sys.stderr)
            if e.retry_after:  # 429 and 503 are worth retrying, after this many seconds
                print(f"  retry after {e.retry_after} s", file=sys.stderr)
            return 1
        except httpx.TransportError as e:
            print(f"error: no answer from {BASE_URL}: {e!r}", file=sys.stderr)
            return 2
    trace = result["trace"]
    print("data:", json.dumps(result["data"], ensure_ascii=False))
    print(f"trace: step_name={trace['step_name']} attempts={trace['attempts']} "
          f"tokens={trace['usage']['total']} duration={trace['duration']} "
          f"model={trace['model']} request_id={trace['request_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv)))
