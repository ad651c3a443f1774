"""Stream an aiwfd agent's answer and rebuild it from its `patch` events.

    AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
        python examples/python/stream_client.py review-analyzer '{"product": "Kettle", "review": "Boils fast."}'

POST /agent/{agent}/stream, read the server-sent events, apply each `patch`
to the document (examples/python/patch.py, starting from null) and, on a
terminal, redraw the document as it grows. A `retry` event resets the
document to null. At `result` the rebuilt document must equal `result.data`:
then `data`, the trace and a `stream:` line are printed (exit 0), else the
difference is (exit 3). With `--json` the only output is one JSON object,
{"document", "data", "trace", "patches", "retries"}, for programs.

Errors as in the other examples: an error answer before the stream
(401, 404, 422, ...) or an `error` event in it goes to stderr with exit
status 1; no answer at all, or a stream that ends before its `result`, is
exit status 2. Standard library only (Python 3.10+).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPException, HTTPResponse
from typing import Any, Iterator

from patch import apply  # examples/python/patch.py, beside this file

BASE_URL = os.environ.get("AIWFD_URL", "http://127.0.0.1:8080").rstrip("/")
API_KEY = os.environ.get("AIWFD_API_KEY", "")
# The longest silence tolerated between two reads. aiwfd sends a keep-alive
# comment every 15 s, so only a dead connection is this quiet.
TIMEOUT = 70
# Redraw at most this often: rendering the whole document on every patch
# would make the client's cost grow with the square of the answer.
REDRAW_EVERY = 0.05


class AgentError(Exception):
    """An error answered by aiwfd (or a proxy) before the stream, or an `error` event in it."""

    def __init__(self, status: int | None, type_: str, message: str, details: list[Any],
                 request_id: str | None, retry_after: str | None = None) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message = status, type_, message
        self.details, self.request_id, self.retry_after = details, request_id, retry_after


class StreamBroken(Exception):
    """No answer at all, or a stream that ended (or broke) before its `result` event."""


def error_answer(e: urllib.error.HTTPError) -> AgentError:
    text = e.read().decode("utf-8", "replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        # Not aiwfd's error shape: e.g. an HTML page from a proxy.
        return AgentError(e.code, "http_error", text[:200].strip() or str(e.reason), [],
                          e.headers.get("X-Request-ID"), e.headers.get("Retry-After"))
    return AgentError(e.code, err.get("type", "unknown"), err.get("message", ""), err.get("details") or [],
                      doc.get("request_id") or e.headers.get("X-Request-ID"), e.headers.get("Retry-After"))


def events(resp: HTTPResponse) -> Iterator[tuple[str, Any]]:
    """(event name, parsed data) for each server-sent event; comments skipped."""
    name = "message"
    data: list[str] = []
    for raw in resp:  # one line at a time, as the chunks arrive
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:  # a blank line ends an event
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif not line.startswith(":"):  # ":" starts a comment (`: keep-alive`)
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


class Screen:
    """The document so far, redrawn in place on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.drawn = 0  # lines on screen now
        self.last = 0.0

    def show(self, doc: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < REDRAW_EVERY):
            return
        self.last = now
        size = shutil.get_terminal_size()
        # Only what fits: the cursor cannot move back above the top of the
        # screen, and a wrapped line would count twice.
        lines = [ln[:size.columns - 1] for ln in json.dumps(doc, indent=2, ensure_ascii=False).splitlines()]
        lines = lines[-(size.lines - 1):]
        self.clear()
        sys.stdout.write("".join(ln + "\n" for ln in lines))
        sys.stdout.flush()
        self.drawn = len(lines)

    def clear(self) -> None:
        if self.enabled and self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the first line drawn, erase below
            sys.stdout.flush()
        self.drawn = 0


def stream(agent: str, body: dict[str, Any], screen: Screen) -> dict[str, Any]:
    """The `result` event's data, with "document" (rebuilt from the patches),
    "patches" and "retries" added; raises AgentError or StreamBroken."""
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if API_KEY:
        headers["X-API-Key"] = API_KEY
    req = urllib.request.Request(f"{BASE_URL}/agent/{agent}/stream", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    doc: Any = None
    patches = retries = 0
    answered = False
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            answered = True
            for name, data in events(resp):
                if name == "patch":
                    doc = apply(doc, data)
                    patches += 1
                    screen.show(doc)
                elif name == "retry":
                    # The output so far failed validation: it is discarded,
                    # and the next patch starts from null again.
                    doc, retries = None, retries + 1
                    screen.clear()
                    problems = "; ".join(f"{e.get('path') or '(root)'}: {e.get('message')}"
                                         for e in data.get("errors") or [])
                    print(f"retry: attempt {data.get('attempt')}: {problems}", file=sys.stderr)
                elif name == "result":
                    screen.show(doc, force=True)
                    screen.clear()
                    return {**data, "document": doc, "patches": patches, "retries": retries}
                elif name == "error":
                    screen.clear()
                    err = data.get("error") or {}
                    raise AgentError(None, err.get("type", "unknown"), err.get("message", ""),
                                     err.get("details") or [], data.get("request_id"))
                # start and delta: nothing to do here (delta is the raw text the patches parse)
    except urllib.error.HTTPError as e:
        raise error_answer(e) from None
    except (OSError, HTTPException) as e:  # URLError, refused, reset, timeout, cut chunk
        screen.clear()
        where = f"the stream from {BASE_URL} broke" if answered else f"no answer from {BASE_URL}"
        raise StreamBroken(f"{where}: {e!r}") from None
    screen.clear()
    raise StreamBroken(f"the stream from {BASE_URL} ended without a result event")


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    args = [a for a in argv[1:] if a != "--json"]
    agent = args[0] if args else "greeter"
    body = json.loads(args[1]) if len(args) > 1 else {"name": "Alice"}
    try:
        result = stream(agent, body, Screen(sys.stdout.isatty() and not as_json))
    except AgentError as e:
        # An error event comes after the 200 went out: it has no status of its own.
        status = f"{e.status} " if e.status is not None else ""
        print(f"error: {status}{e.type}: {e.message} (request_id {e.request_id})", file=sys.stderr)
        for d in e.details:
            print(f"  {d.get('path') or '(body)'}: {d.get('message')}", file=sys.stderr)
        if e.retry_after:  # 429 and 503 are worth retrying, after this many seconds
            print(f"  retry after {e.retry_after} s", file=sys.stderr)
        return 1
    except StreamBroken as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc, data, trace = result["document"], result["data"], result["trace"]
    # Patches are sent for object outputs only: with none, there is nothing to compare.
    same = result["patches"] == 0 or doc == data
    if as_json:
        print(json.dumps({k: result[k] for k in ("document", "data", "trace", "patches", "retries")},
                         ensure_ascii=False))
    else:
        print("data:", json.dumps(data, ensure_ascii=False))
        print(f"trace: step_name={trace['step_name']} attempts={trace['attempts']} "
              f"tokens={trace['usage']['total']} duration={trace['duration']} "
              f"model={trace['model']} request_id={trace['request_id']}")
        print(f"stream: patches={result['patches']} retries={result['retries']} "
              f"rebuilt={'none' if result['patches'] == 0 else 'equal' if same else 'different'}")
    if not same:
        print("error: the patches rebuilt\n  " + json.dumps(doc, ensure_ascii=False)
              + "\nbut result.data is\n  " + json.dumps(data, ensure_ascii=False), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
