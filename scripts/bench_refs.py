"""Reference forwarders for scripts/bench.py: the least code that does aiwfd's job.

    python scripts/bench_refs.py --variant raw --port 8101 --upstream http://127.0.0.1:8100/v1

An aiohttp app whose handler reads the JSON body, makes the same
chat-completions call aiwfd makes for the greeter of scripts/bench/bench.yaml
(same model, messages, max_tokens, temperature and response_format),
`json.loads` the answer's content and returns `{"data", "trace"}`. Nothing else:
no validation, no auth, no request log, no retries. The variants differ only in
the client used for the upstream call:

  raw               a plain shared aiohttp.ClientSession POST (connector limit=0, as aiwfd's)
  sdk-default       AsyncOpenAI(max_retries=0).chat.completions.create
  sdk-lean          the cheapest use of the openai SDK measured (see LEAN below)

and, for `scripts/bench.py --stream`, on `POST /agent/{name}/stream`:

  stream-raw        the same call with "stream": true over a plain aiohttp.ClientSession; each
                    content delta of the upstream event stream is written to the client as
                    `event: delta` {"text"}, then one `event: result` {"text": <the joined text>}.
                    No validation, no parsing of the answer: the floor of a streamed call.

and the candidates measured for sdk-lean (`python scripts/bench.py --lean-survey`):

  sdk-aiohttp       create() over the SDK's aiohttp transport (http_client=DefaultAioHttpClient())
  sdk-raw-response  chat.completions.with_raw_response.create() over the aiohttp transport
  sdk-post          client.post("/chat/completions", body=payload, cast_to=httpx.Response)
  sdk-post-aiohttp  the same over the aiohttp transport
  sdk-post-bytes    client.post(content=<json bytes>, cast_to=httpx.Response) over the aiohttp transport

`GET /health` answers 200 (the benchmark measures start-up with it). Runs on
uvloop when it is installed, as aiwfd does. Prints `LISTENING <port>` once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

# What aiwfd sends for the greeter of scripts/bench/bench.yaml (tests/system/test_bench.py
# checks this against aiwfd's own compiler, so the two cannot drift apart).
MODEL = "gpt-4o-mini"
SYSTEM_PROMPT = "Generate a friendly greeting"
MAX_TOKENS = 2000
TEMPERATURE = 0.7
RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "GreetingResponse",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
            "additionalProperties": False,
        },
    },
}

# The fastest candidate of the lean survey on the 2-core bench machine (BENCHMARKS.md).
LEAN = "sdk-post-bytes"

VARIANTS = ("raw", "sdk-default", "sdk-lean", "sdk-aiohttp", "sdk-raw-response",
            "sdk-post", "sdk-post-aiohttp", "sdk-post-bytes", "stream-raw")

# What aiwfd sends for the agents of scripts/bench/stream.yaml (checked against
# aiwfd's compiler by tests/system/test_bench.py, as the greeter's call is).
STREAM_MODELS = {"stream_1k": "bench-stream-1k", "stream_4k": "bench-stream-4k", "stream_16k": "bench-stream-16k"}
STREAM_SYSTEM_PROMPT = "List the work items for the topic"
STREAM_MAX_TOKENS = 20000
STREAM_TEMPERATURE = 0.2
_ITEM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "title": {"type": "string"}, "done": {"type": "boolean"},
        "estimate": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
        "note": {"type": "string"},
    },
    "required": ["id", "title", "done", "estimate", "tags", "note"],
    "additionalProperties": False,
}
STREAM_RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "Out",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "required": ["items"],
            "additionalProperties": False,
            "$defs": {"Item": _ITEM},
        },
    },
}

Call = Callable[[dict[str, Any]], Awaitable[tuple[str, dict[str, Any], str]]]


def payload_for(body: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps(body, separators=(",", ":"), ensure_ascii=False)},
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "response_format": RESPONSE_FORMAT,
    }


def stream_payload_for(agent: str, body: Any) -> dict[str, Any]:
    """The streamed call aiwfd makes for `agent` of scripts/bench/stream.yaml."""
    return {
        "model": STREAM_MODELS[agent],
        "messages": [
            {"role": "system", "content": STREAM_SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps(body, separators=(",", ":"), ensure_ascii=False)},
        ],
        "max_tokens": STREAM_MAX_TOKENS,
        "temperature": STREAM_TEMPERATURE,
        "response_format": STREAM_RESPONSE_FORMAT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _from_doc(doc: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """(content, usage, model) of a chat completion as a dict."""
    return doc["choices"][0]["message"]["content"], doc.get("usage") or {}, doc.get("model") or MODEL


def make_call(variant: str, upstream: str, api_key: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    """The upstream call for a variant, and how to close its client."""
    if variant == "sdk-lean":
        variant = LEAN
    url = upstream.rstrip("/") + "/chat/completions"

    if variant == "raw":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

        async def call_raw(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            async with session.post(url, data=json.dumps(payload), headers=headers) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"upstream status {r.status}")
            return _from_doc(json.loads(raw))

        return call_raw, session.close

    import openai

    try:
        import httpx2 as httpx  # the SDK's transport in the installed release
    except ImportError:  # older SDK releases use httpx
        import httpx  # type: ignore[no-redef]

    kwargs: dict[str, Any] = {"api_key": api_key, "base_url": upstream, "max_retries": 0}
    if variant in ("sdk-aiohttp", "sdk-raw-response", "sdk-post-aiohttp", "sdk-post-bytes"):
        kwargs["http_client"] = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(**kwargs)

    if variant in ("sdk-default", "sdk-aiohttp"):
        async def call_create(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            resp = await client.chat.completions.create(**payload)
            u = resp.usage
            usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens} if u else {}
            return resp.choices[0].message.content or "", usage, resp.model

        return call_create, client.close

    if variant == "sdk-raw-response":
        async def call_raw_response(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            raw = await client.chat.completions.with_raw_response.create(**payload)
            return _from_doc(json.loads(raw.content))

        return call_raw_response, client.close

    if variant in ("sdk-post", "sdk-post-aiohttp"):
        async def call_post(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            resp = await client.post("/chat/completions", body=payload, cast_to=httpx.Response)
            return _from_doc(json.loads(resp.content))

        return call_post, client.close

    if variant == "sdk-post-bytes":
        options: Any = {"headers": {"Content-Type": "application/json"}}

        async def call_post_bytes(payload: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
            resp = await client.post("/chat/completions", content=json.dumps(payload).encode(),
                                     options=options, cast_to=httpx.Response)
            return _from_doc(json.loads(resp.content))

        return call_post_bytes, client.close

    raise SystemExit(f"unknown variant {variant!r}")


def create_app(call: Call, close: Callable[[], Awaitable[None]]) -> web.Application:
    async def agent(request: web.Request) -> web.Response:
        started = time.monotonic()
        body = json.loads(await request.read())
        content, usage, model = await call(payload_for(body))
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        trace = {
            "step_name": request.match_info["name"],
            "usage": {"prompt": prompt, "completion": completion, "total": prompt + completion},
            "attempts": 1,
            "duration": f"{round((time.monotonic() - started) * 1000)}ms",
            "model": model,
        }
        return web.json_response({"data": json.loads(content), "trace": trace})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def on_cleanup(app: web.Application) -> None:
        await close()

    app = web.Application()
    app.router.add_post("/agent/{name}", agent)
    app.router.add_get("/health", health)
    app.on_cleanup.append(on_cleanup)
    return app


SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def create_stream_app(upstream: str, api_key: str) -> web.Application:
    """stream-raw: forward the upstream's content deltas as events, nothing else."""
    url = upstream.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
               "Accept": "text/event-stream"}
    sessions: list[aiohttp.ClientSession] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        payload = stream_payload_for(request.match_info["name"], json.loads(await request.read()))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        parts: list[str] = []
        async with sessions[0].post(url, data=json.dumps(payload), headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"upstream status {r.status}")
            pending = b""
            async for chunk in r.content.iter_any():
                *events, pending = (pending + chunk).split(b"\n\n")
                for ev in events:
                    # the upstream's events are one `data:` line each
                    data = ev[ev.find(b"data: ") + 6:]
                    if data == b"[DONE]":
                        break
                    choices = json.loads(data)["choices"]
                    text = choices[0]["delta"].get("content") if choices else None
                    if text:
                        parts.append(text)
                        await resp.write(b"event: delta\ndata: " + json.dumps({"text": text}).encode() + b"\n\n")
        await resp.write(b"event: result\ndata: " + json.dumps({"text": "".join(parts)}).encode() + b"\n\n")
        await resp.write_eof()
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def on_startup(app: web.Application) -> None:
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))

    async def on_cleanup(app: web.Application) -> None:
        await sessions[0].close()

    app = web.Application()
    app.router.add_post("/agent/{name}/stream", stream)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(args: argparse.Namespace) -> None:
    api_key = os.environ.get("OPENAI_API_KEY", "sk-bench")
    if args.variant == "stream-raw":
        app = create_stream_app(args.upstream, api_key)
    else:
        call, close = make_call(args.variant, args.upstream, api_key)
        app = create_app(call, close)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    print(f"LISTENING {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream", required=True, help="the fake's base URL, e.g. http://127.0.0.1:8100/v1")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio even when uvloop is installed")
    args = p.parse_args(argv)
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(serve(args))
            return
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
