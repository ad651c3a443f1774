"""`POST /agent/{name}/batch` (SPEC §7.5): many inputs for one agent, one answer.

The body is `{"inputs": [ … ]}`, at most `server.batch_max` inputs (default
100); a body without an `inputs` array, with another key, or over the limit
is a 422 `invalid_input` for the whole batch. Auth, the agent, the media type
and the body are checked first, exactly as for `POST /agent/{name}`.

The answer is `200 {"results": [ … ]}`, one item per input, in input order:

- `{"data", "trace"}`: as the plain call answers it; `trace.request_id` is
  the batch's request id (`X-Request-ID`), shared by every item;
- `{"error": {"type", "message", "details"}}`: the §3.1 error object of that
  input alone, without a `request_id` of its own (the batch's is in the
  header; the item is known by its position). An input that fails the input
  schema is `invalid_input` with `details` paths relative to the input, as
  the plain call would report them; a provider failure is the error the plain
  call would have answered (`upstream_error`, `rate_limited`, …).

One input's failure never fails the others. At most `server.batch_concurrency`
(default 8) inputs are being answered at once: that many workers take the
inputs in order (a pool rather than a task per input behind a semaphore: the
same bound, fewer tasks). The batch shares one deadline (`--deadline`, the
same as one plain call, so that a batch still answers before nginx's
`proxy_read_timeout`): an input whose turn comes after it is an
`upstream_timeout` error.

The request log has one line for the batch, with attempts and tokens summed
over its inputs; the agent metrics count one call per input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from aiwfd.http import idempotency, quota, views
from aiwfd.engine import CallStats, call_agent
from aiwfd.spec.compiler import CompiledAgent
from aiwfd.errors import HTTPError, InternalError, InvalidInput, UpstreamTimeout
from aiwfd.spec.jsonparse import json_kind
from aiwfd.http.keys import CLIENT, REQUEST_ID, RUNTIME, STATS
from aiwfd.http.middlewares import json_response
from aiwfd.http.runtime import Runtime, Snapshot

logger = logging.getLogger("aiwfd")


async def handler(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    async with rt.lease() as snap:
        agent, body = await views.begin(request, rt, snap, idempotent=True)
        server = snap.compiled.config.server
        inputs = read_inputs(body, server.batch_max)
        total = request[STATS] = CallStats()
        client = request[CLIENT]
        # Counted per input that will call the model; a window that cannot take them all refuses the batch.
        checked = [check_item(agent, item) for item in inputs]
        calls = checked.count(None)
        # At once: what batch_concurrency allows, and no more than a concurrency limit
        # could ever take (a batch is never refused for being wider than the limit).
        width = min(server.batch_concurrency, quota.narrowest(snap, client, agent))

        async def run() -> web.Response:
            async with quota.admitted(request, rt, snap, client, agent, cost=calls, slots=min(calls, width)):
                results = await run_batch(rt, snap, agent, inputs, request[REQUEST_ID], width,
                                          total, client.label, checked)
            return json_response({"results": results})

        return await idempotency.guarded(request, rt, agent, body, run)


def read_inputs(body: dict[str, Any], limit: int) -> list[Any]:
    """The `inputs` array, or a 422 saying what is wrong with the body."""
    errors = [{"path": k, "message": 'unknown field (a batch body is {"inputs": [ … ]})'}
              for k in body if k != "inputs"]
    inputs = body.get("inputs")
    if "inputs" not in body:
        errors.insert(0, {"path": "inputs", "message": "required field is missing"})
    elif not isinstance(inputs, list):
        errors.insert(0, {"path": "inputs", "message": f"expected an array, got {json_kind(inputs)}"})
    elif len(inputs) > limit:
        errors.insert(0, {"path": "inputs",
                          "message": f"{len(inputs)} inputs; a batch holds at most {limit} (server.batch_max)"})
    if errors:
        raise InvalidInput('a batch body is {"inputs": [ … ]} with at most '
                           f"{limit} inputs", details=errors)
    assert isinstance(inputs, list)
    return inputs


def check_item(agent: CompiledAgent, item: Any) -> InvalidInput | None:
    if not isinstance(item, dict):
        return InvalidInput("an input must be a JSON object",
                            details=[{"path": "", "message": f"expected an object, got {json_kind(item)}"}])
    try:
        views.check_input(agent, item)
    except InvalidInput as e:
        return e
    return None


def item_error(err: HTTPError) -> dict[str, Any]:
    return {"error": {"type": err.type, "message": err.message, "details": err.details}}


async def run_batch(rt: Runtime, snap: Snapshot, agent: CompiledAgent, inputs: list[Any], rid: str,
                    concurrency: int, total: CallStats, label: str = "anonymous",
                    checked: list[InvalidInput | None] | None = None) -> list[Any]:
    """Every input of a batch; `label` is the caller's metrics label (Client.label),
    `checked` each input's `check_item` when the caller has made them."""
    started = time.monotonic()
    metrics = rt.metrics
    results: list[Any] = [None] * len(inputs)
    todo: list[int] = []
    for i, item in enumerate(inputs):
        err = checked[i] if checked is not None else check_item(agent, item)
        if err is None:
            todo.append(i)
        else:
            results[i] = item_error(err)
            metrics.record_agent(agent, None, err.status, err.type, label)

    client = snap.client(agent)
    deadline = rt.settings.deadline

    async def one(i: int) -> None:
        stats = CallStats()
        remaining = deadline - (time.monotonic() - started)
        try:
            if remaining <= 0:
                raise UpstreamTimeout("the batch's deadline passed before this input's turn")
            results[i] = await call_agent(snap.compiled, agent, client, inputs[i], rid, remaining, stats)
            metrics.record_agent(agent, stats, 200, None, label)
        except HTTPError as e:
            results[i] = item_error(e)
            metrics.record_agent(agent, stats, e.status, e.type, label)
        except Exception:  # a bug: this input's error, never the batch's
            logger.exception("internal error (request_id=%s, input %d)", rid, i, extra={"request_id": rid})
            err = InternalError(f"internal error; the server log has the details under request id {rid}, input {i}")
            results[i] = item_error(err)
            metrics.record_agent(agent, stats, err.status, err.type, label)
        total.attempts += stats.attempts
        total.prompt_tokens += stats.prompt_tokens
        total.completion_tokens += stats.completion_tokens
        total.upstream_seconds.extend(stats.upstream_seconds)

    pending = iter(todo)

    async def worker() -> None:
        for i in pending:  # shared: each input is taken by exactly one worker
            await one(i)

    n = min(concurrency, len(todo))
    if n == 1:
        await worker()
    elif n > 1:
        await asyncio.gather(*(worker() for _ in range(n)))
    return results
