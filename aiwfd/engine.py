"""One agent call: ask the model, validate, re-ask, retry, and build the trace.

Attempts are model calls: a re-ask after an invalid answer and a retry after a
transport failure (connection error, timeout, 429, 5xx) both spend one, so
`trace.attempts` counts exactly what the provider saw. The engine knows the
providers' error tree (aiwfd.providers.errors) and nothing of a transport.
The clock, the sleep and the backoff's random source are a `Timing`, so a
test can run the retry loop without waiting out real jittered backoff.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import orjson

from aiwfd import telemetry
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.spec.jsonparse import dump_compact
from aiwfd.spec.config import Provider
from aiwfd.errors import (
    HTTPError, InvalidOutput, RateLimited, Unavailable, UpstreamError, UpstreamTimeout,
)
from aiwfd.providers.base import DEFAULT_TIMEOUT, ChatResult, ModelClient
from aiwfd.providers.errors import ProviderError, ProviderTimeout, StatusError, Unreachable
from aiwfd.logs import go_duration

BACKOFF_BASE = 0.25
BACKOFF_CAP = 4.0
MAX_QUOTED_ERRORS = 10


@dataclass(frozen=True)
class Timing:
    """Where the retry loop reads the time, how it waits, and the jitter of its backoff."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    jitter: Callable[[], float] = random.random  # uniform in [0, 1)


REAL_TIMING = Timing()


@dataclass
class CallStats:
    """What one call cost, for the trace, the request log and metrics."""

    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_seconds: list[float] = field(default_factory=list)
    # (model, provider, error type) of each model that failed and handed the call on (SPEC §11.1).
    fallbacks: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def compact_json(value: Any) -> str:
    return dump_compact(value).decode()


def build_payload(agent: CompiledAgent, body: Any) -> dict[str, Any]:
    a = agent.assistant
    messages = []
    if a.system_prompt:
        messages.append({"role": "system", "content": a.system_prompt})
    messages.append({"role": "user", "content": compact_json(body)})
    payload: dict[str, Any] = {
        "model": a.model,
        "messages": messages,
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
    }
    if agent.response_format is not None:
        payload["response_format"] = agent.response_format
    return payload


def check_answer(compiled: Compiled, agent: CompiledAgent, result: ChatResult) -> tuple[Any, list[dict[str, str]]]:
    """(data, errors): the answer parsed, unwrapped and validated."""
    if result.refusal:
        return None, [{"path": "", "message": f"the model refused: {result.refusal}"}]
    content = result.content
    if agent.output_validator is None:
        if content is None:
            return None, [{"path": "", "message": "the model returned no text"}]
        return content, []
    if content is None:
        return None, [{"path": "", "message": "the model returned no content"}]
    try:
        raw = orjson.loads(content)
    except orjson.JSONDecodeError as e:
        truncated = " (the answer was cut off at max_tokens)" if result.finish_reason == "length" else ""
        return None, [{"path": "", "message": f"not valid JSON: {e}{truncated}"}]
    if agent.wrapped and not (isinstance(raw, dict) and "value" in raw):
        return None, [{"path": "", "message": 'expected an object {"value": …}'}]
    data = compiled.clean_output(agent, raw)
    return data, agent.output_validator.errors(data)


class Listener(Protocol):
    """What a streamed call tells as it goes (aiwfd.http.stream writes it as events)."""

    async def delta(self, text: str) -> None:
        """The next piece of the current attempt's answer."""

    async def retry(self, attempt: int, failure: HTTPError) -> None:
        """Attempt `attempt` starts because the previous one failed with `failure`
        (InvalidOutput: the answer did not validate; else a transport failure)."""


def reask_message(errors: list[dict[str, str]]) -> str:
    lines = [f"- {e['path'] or '(root)'}: {e['message']}" for e in errors[:MAX_QUOTED_ERRORS]]
    return ("Your answer does not match the required JSON schema:\n" + "\n".join(lines)
            + "\nAnswer again with JSON that fixes these errors.")


@dataclass(frozen=True)
class Candidate:
    """One model an agent may be answered by: its own, or a fallback's."""

    model: str
    provider: Provider
    client: ModelClient


class Models(tuple[Candidate, ...]):  # a subclass, to be told from a client
    """The models of an agent with `fallbacks:` (SPEC §11.1), in the order they are tried."""

    __slots__ = ()


async def call_agent(
    compiled: Compiled,
    agent: CompiledAgent,
    client: ModelClient | Models,
    body: Any,
    request_id: str,
    deadline: float,
    stats: CallStats,
    listener: Listener | None = None,
    timing: Timing = REAL_TIMING,
) -> dict[str, Any]:
    """Run the agent; returns `{"data", "trace"}` or raises an HTTPError.

    With a `listener` the model is called streaming (`client.stream`): the
    listener sees each piece of the answer, and hears before every attempt
    after a failed one why that one failed (SPEC §7.4). Otherwise the same.

    `client` is the agent's provider client, or its `Models` when it has
    fallbacks: each is tried in turn, with its own `max_attempts`, when the
    one before ends in a provider failure (after its retries) or in invalid
    output, all within the one deadline. A model that times out hands over at
    once when a fallback is left: a hanging provider must not eat the
    fallbacks' time with retries. When every model failed, the error is the
    first model's, with every failure in its `details`.
    """
    tracer = telemetry.TRACER
    if tracer is None:
        return await _call_agent(compiled, agent, client, body, request_id, deadline, stats, listener, timing)
    span = tracer.start_span(f"invoke_agent {agent.name}", telemetry.INTERNAL, {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": agent.name})
    token = telemetry.attach(span)
    try:
        return await _call_agent(compiled, agent, client, body, request_id, deadline, stats, listener, timing)
    except HTTPError as e:
        span.set_error(e.type, e.message)
        raise
    finally:
        telemetry.detach(token)
        span.set_attribute("aiwfd.attempts", stats.attempts)
        span.end()


async def _call_agent(compiled: Compiled, agent: CompiledAgent, client: ModelClient | Models, body: Any,
                      request_id: str, deadline: float, stats: CallStats, listener: Listener | None,
                      timing: Timing) -> dict[str, Any]:
    a = agent.assistant
    started = timing.clock()
    # An explicit timeout longer than the deadline is the user raising the deadline.
    end = started + max(deadline, a.timeout or agent.provider.timeout or 0)
    models: tuple[Candidate, ...] = client if isinstance(client, Models) else (
        Candidate(a.model, agent.provider, client),)
    failures: list[tuple[Candidate, HTTPError]] = []
    for i, model in enumerate(models):
        payload = build_payload(agent, body)
        payload["model"] = model.model
        outcome = await _ask(compiled, agent, model, payload, end, stats, listener, timing,
                             failures[-1][1] if failures else None, has_next=i + 1 < len(models))
        if not isinstance(outcome, HTTPError):
            t = trace(agent, stats, timing.clock() - started, request_id)
            t["model"] = model.model
            if isinstance(client, Models):
                t["provider"] = model.provider.name
                t["fallbacks"] = [_failure_doc(m, e) for m, e in failures]
            return {"data": outcome.value, "trace": t}
        failures.append((model, outcome))
        if i + 1 < len(models):
            stats.fallbacks.append((model.model, model.provider.name, outcome.type))
        if end - timing.clock() <= 0:
            break
    if len(failures) == 1:
        raise failures[0][1]
    first = failures[0][1]
    every = [{"path": "", "message": f"{m.provider.name}/{m.model}: {e.message}", "model": m.model,
              "provider": m.provider.name, "type": e.type} for m, e in failures]
    raise type(first)(f"every model failed ({len(failures)}); the first: {first.message}",
                      details=every, headers=first.headers)


@dataclass(frozen=True)
class _Answer:
    value: Any


def _failure_doc(model: Candidate, e: HTTPError) -> dict[str, Any]:
    return {"model": model.model, "provider": model.provider.name,
            "error": {"type": e.type, "message": e.message}}


async def _ask(compiled: Compiled, agent: CompiledAgent, model: Candidate, payload: dict[str, Any], end: float,
               stats: CallStats, listener: Listener | None, timing: Timing, previous: HTTPError | None,
               has_next: bool) -> _Answer | HTTPError:
    """One model's attempts: its answer, or the failure it ended with."""
    a = agent.assistant
    clock = timing.clock
    client = model.client
    timeout = a.timeout or model.provider.timeout or DEFAULT_TIMEOUT
    last_failure: HTTPError | None = previous
    attempts = 0
    while attempts < a.max_attempts:
        remaining = end - clock()
        if remaining <= 0:
            break
        if listener is not None and last_failure is not None:
            await listener.retry(stats.attempts + 1, last_failure)
        attempts += 1
        stats.attempts += 1
        t0 = clock()
        chat = _chat_span(agent, model, payload, stats.attempts) if telemetry.TRACER is not None else None
        try:
            if listener is None:
                result = await client.complete(payload, min(timeout, remaining), agent)
            else:
                result = await client.stream(payload, min(timeout, remaining), agent, listener.delta)
        except ProviderError as e:
            stats.upstream_seconds.append(clock() - t0)
            last_failure, retryable, wait = classify(e, attempts, timing.jitter())
            if chat is not None:
                _end_chat(chat, None, last_failure.type)
            chat = None
            if not retryable or attempts >= a.max_attempts:
                break
            if has_next and isinstance(e, ProviderTimeout):
                break
            if clock() + wait >= end:
                break
            await timing.sleep(wait)
            continue
        except BaseException as e:  # cancelled (the client went away, a job canceled): the span still ends
            if chat is not None:
                _end_chat(chat, None, "cancelled" if isinstance(e, asyncio.CancelledError) else type(e).__name__)
            raise
        stats.upstream_seconds.append(clock() - t0)
        stats.prompt_tokens += result.prompt_tokens
        stats.completion_tokens += result.completion_tokens
        data, errors = check_answer(compiled, agent, result)
        if chat is not None:
            _end_chat(chat, result, InvalidOutput.type if errors else None)
        if not errors:
            return _Answer(data)
        last_failure = InvalidOutput(
            f"the model's answer did not match the output type after {attempts} "
            f"attempt{'s' if attempts != 1 else ''}",
            details=errors,
        )
        if result.content is not None:
            payload["messages"] = payload["messages"] + [
                {"role": "assistant", "content": result.content},
                {"role": "user", "content": reask_message(errors)},
            ]
    if last_failure is None or last_failure is previous:
        return UpstreamTimeout("no time left to call the model within the deadline")
    return last_failure


_GENAI_PROVIDERS = {"openai": "openai", "grok": "x_ai", "mock": "aiwfd.mock"}


def _chat_span(agent: CompiledAgent, model: Candidate, payload: dict[str, Any], attempt: int) -> tuple[Any, object]:
    """The CLIENT span of one model call (SPEC §11.2), current while the
    provider is called so that its request carries `traceparent`."""
    tracer = telemetry.TRACER
    assert tracer is not None
    p = model.provider
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": _GENAI_PROVIDERS.get(p.kind, p.name),
        "gen_ai.request.model": model.model,
        "gen_ai.request.max_tokens": payload.get("max_tokens"),
        "gen_ai.request.temperature": payload.get("temperature"),
        "gen_ai.output.type": "json" if agent.response_format is not None else "text",
        "aiwfd.attempt": attempt,
        "aiwfd.provider": p.name,
    }
    host, port = getattr(model.client, "address", (None, None))
    if host:
        attributes["server.address"] = host
    if port:
        attributes["server.port"] = port
    if telemetry.CAPTURE_CONTENT:
        attributes["gen_ai.input.messages"] = compact_json(payload["messages"])
    span = tracer.start_span(f"chat {model.model}", telemetry.CLIENT, attributes)
    return span, telemetry.attach(span)


def _end_chat(chat: tuple[Any, object], result: ChatResult | None, error_type: str | None) -> None:
    span, token = chat
    telemetry.detach(token)
    if result is not None:
        attributes = span.attributes  # set directly: this runs on every model call
        if result.model:
            attributes["gen_ai.response.model"] = result.model
        if result.response_id:
            attributes["gen_ai.response.id"] = result.response_id
        if result.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = [result.finish_reason]
        attributes["gen_ai.usage.input_tokens"] = result.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = result.completion_tokens
        if telemetry.CAPTURE_CONTENT and result.content is not None:
            attributes["gen_ai.output.messages"] = compact_json(
                [{"role": "assistant", "parts": [{"type": "text", "content": result.content}]}])
    if error_type is not None:
        span.set_error(error_type)
    span.end()


def trace(agent: CompiledAgent, stats: CallStats, elapsed: float, request_id: str) -> dict[str, Any]:
    return {
        "step_name": agent.name,
        "usage": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens,
                  "total": stats.total_tokens},
        "attempts": stats.attempts,
        "duration": go_duration(elapsed),
        "model": agent.assistant.model,
        "request_id": request_id,
    }


def classify(e: ProviderError, attempt: int, jitter: float) -> tuple[HTTPError, bool, float]:
    """(error answered if this stays the last failure, retryable?, seconds to wait).

    `jitter` in [0, 1) spreads the backoff over its upper half."""
    backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * (0.5 + 0.5 * jitter)
    if isinstance(e, ProviderTimeout):
        return UpstreamTimeout("the model provider did not answer in time"), True, backoff
    if isinstance(e, Unreachable):
        return Unavailable("the model provider is unreachable"), True, backoff
    if isinstance(e, StatusError):
        status = e.status
        if status == 429:
            after = e.retry_after
            wait = after if after is not None else backoff
            hdr = f"{max(1, round(after if after is not None else 1))}"
            return RateLimited(headers={"Retry-After": hdr}), True, wait
        if status >= 500:
            return UpstreamError(f"the model provider answered {status}"), True, backoff
        return UpstreamError(f"the model provider refused the request ({status})"), False, 0.0
    return UpstreamError("the model provider's answer could not be read"), True, backoff
