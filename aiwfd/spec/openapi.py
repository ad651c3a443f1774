"""The OpenAPI 3.1 document of a compiled config (SPEC §7.1), and the
`GET /agent/{name}/schema` answers.

One concrete path per agent (`POST /agent/greeter`, `operationId: greeter`),
so that a generated client gets one typed method per agent. Named types become
`components/schemas/<Type>` (imported ones keep their `alias.Type` key) and
every `#/$defs/X` of the compiled schemas is rewritten to
`#/components/schemas/X`: a `$ref` is resolved against the document it sits
in, and in an OpenAPI document that is the whole document, not the agent's
schema. aiwfd's own schemas are named `aiwfd-…`: a type name cannot contain
`-`, so they never collide with the user's.

`auth` says what the agent operations require:

- "required": API_KEY or the agents file's `auth:` is set; every agent
  operation documents 401.
- "none": neither is set; a key is accepted and ignored.
- "unknown": `aiwfd compile` (API_KEY is a property of the running daemon);
  the operations show the key as optional and document 401, unless the file
  has `auth:`, which makes credentials required whatever the environment.

The rest comes from the file (SPEC §8): 403 on the operations of an agent
that an allowlist leaves out or that a JWT needs a scope for, 429 on every
operation when a limit applies to the agent (the plain call has it anyway:
the provider's 429), the `RateLimit-Policy` / `RateLimit` headers when a
requests limit does, and `GET /.well-known/oauth-protected-resource` with
`auth.jwt`.

Pure functions of the config, cheap enough to run once per load; only the
standard library and aiwfd's compiler (`aiwfd compile` imports this).
"""

from __future__ import annotations

from typing import Any, Literal

from aiwfd import __version__

from aiwfd.spec import typedsl
from aiwfd.spec.access import LimitSet
from aiwfd.spec.compiler import Compiled, CompiledAgent
from aiwfd.spec.config import Config
from aiwfd.errors import (
    Conflict, Forbidden, HeadersTooLarge, HTTPError, IdempotencyKeyReused, InternalError, InvalidInput, InvalidJSON,
    InvalidOutput,
    InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, RateLimited, RequestTimeout, Unauthorized, Unavailable,
    UnsupportedMediaType, UpstreamError, UpstreamTimeout, URITooLong,
)

Auth = Literal["required", "none", "unknown"]

OPENAPI_VERSION = "3.1.0"
ERROR = "aiwfd-Error"
TRACE = "aiwfd-Trace"
AGENT_INFO = "aiwfd-AgentInfo"
ITEM_ERROR = "aiwfd-ItemError"
DEFS_PREFIX = "#/$defs/"
COMPONENTS_PREFIX = "#/components/schemas/"

# Every error of SPEC §3.1, in status order.
ERROR_CLASSES: tuple[type[HTTPError], ...] = (
    InvalidJSON, InvalidRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, RequestTimeout, Conflict,
    PayloadTooLarge, URITooLong, UnsupportedMediaType, HeadersTooLarge, InvalidInput, IdempotencyKeyReused, RateLimited,
    InternalError, UpstreamError, InvalidOutput, Unavailable, UpstreamTimeout,
)
ERROR_TYPES: tuple[str, ...] = tuple(c.type for c in ERROR_CLASSES)

# status -> (component name, description)
ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    400: ("InvalidJSON", "`invalid_json`: the body is not JSON, or not a JSON object (strict parsing: "
                         "no NaN, no duplicate keys, no nesting deeper than 64), or its gzip/deflate data "
                         "is invalid; or `invalid_request`: the HTTP request itself is malformed, or its "
                         "`Idempotency-Key` is"),
    401: ("Unauthorized", "`unauthorized`: the credentials are missing or wrong: an unknown API key, or a "
                          "JWT that fails verification (only when the server has API_KEY or `auth:` set)"),
    403: ("Forbidden", "`forbidden`: the client may not call this agent: it is outside the key's `agents` "
                       "allowlist, or the JWT lacks the scope `<scope_prefix><agent>` (or `<scope_prefix>*`)"),
    404: ("NotFound", "`not_found`: unknown agent or path"),
    405: ("MethodNotAllowed", "`method_not_allowed`: wrong method; `Allow` lists the right ones"),
    408: ("RequestTimeout", "`request_timeout`: the body did not arrive within the server's body timeout"),
    409: ("Conflict", "`conflict`: a request with the same `Idempotency-Key` is still running; "
                      "`Retry-After: 1`"),
    413: ("PayloadTooLarge", "`payload_too_large`: the body is over the server's limit (default 1 MiB)"),
    415: ("UnsupportedMediaType", "`unsupported_media_type`: Content-Type is present and not JSON, "
                                  "or a Content-Encoding other than gzip or deflate"),
    422: ("InvalidInput", "`invalid_input`: the body does not match the input schema; "
                          "`details` lists each `{path, message}`; or `idempotency_key_reused`: the "
                          "`Idempotency-Key` was used before with a different body; or a job's "
                          "`Webhook-URL` outside `jobs.allow_request_webhooks`"),
    429: ("RateLimited", "`rate_limited`: a limit of the agents file is reached (`details`: "
                         "`[{limit, scope, quota, window}]`), or the model provider kept answering 429 "
                         "after retries; `Retry-After` says when to try again"),
    500: ("InternalError", "`internal_error`: a bug; the server log has the traceback under the request id"),
    502: ("BadGateway", "`upstream_error`: the provider answered an error; or `invalid_output`: the "
                        "model's answer still failed the output schema after max_attempts (`details`: the last errors)"),
    503: ("Unavailable", "`unavailable`: the server is draining, the provider is unreachable, the limits "
                         "store does not answer (with `on_store_error: deny`), the idempotency key store does "
                         "not answer (a request with an `Idempotency-Key`), the job store does not answer "
                         "(the job routes), or the token issuer's keys are not loaded yet"),
    504: ("UpstreamTimeout", "`upstream_timeout`: the provider timed out on every attempt"),
}

# The statuses a call of an agent can answer (405 cannot: the path has POST);
# 401 only with auth, 403 only when auth can refuse this agent (_restricted).
AGENT_CALL_STATUSES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504)
# What /agent/{name}/stream and /agent/{name}/batch can answer as a status: the
# errors found before the model is called (later ones are an `error` event, or
# an item's error); 429 only when a limit applies (_limited).
STREAM_BATCH_STATUSES = (400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 503)
# A batch takes an Idempotency-Key (SPEC §9.4), a stream does not: 409 too.
BATCH_STATUSES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 503)
# What every other route can answer: a bug, or draining.
SERVICE_STATUSES = (500, 503)


def rewrite_refs(schema: Any) -> Any:
    """A copy of `schema` with `#/$defs/X` references pointing at `#/components/schemas/X`."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(DEFS_PREFIX):
                out[k] = COMPONENTS_PREFIX + v[len(DEFS_PREFIX):]
            else:
                out[k] = rewrite_refs(v)
        return out
    if isinstance(schema, list):
        return [rewrite_refs(v) for v in schema]
    return schema


def type_schema(node: typedsl.Node | None, root: dict[str, Any] | None) -> dict[str, Any]:
    """The schema of a request body or of `data`, as used inside the document."""
    if isinstance(node, typedsl.Ref):
        return {"$ref": COMPONENTS_PREFIX + node.key}
    if root is None:
        return {"type": "object"}
    return rewrite_refs({k: v for k, v in root.items() if k not in ("$schema", "$defs", "title")})


def data_schema(agent: CompiledAgent) -> dict[str, Any]:
    """The schema of `data` in the agent's 200 answer: the output type, or text."""
    a = agent.assistant
    if a.output_type is None:
        return {"type": "string", "description": "the model's answer as plain text (the agent has no output_type)"}
    return type_schema(a.output_type, agent.output_schema)


def agent_schema_doc(agent: CompiledAgent) -> dict[str, Any]:
    """`GET /agent/{name}/schema`: standalone JSON Schemas (draft 2020-12, with `$defs`)."""
    output = agent.output_schema
    if output is None:
        output = {"$schema": typedsl.SCHEMA_DIALECT, "type": "string"}
    return {"input": agent.input_schema, "output": output}


def _error_component() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Every error answered by aiwfd (SPEC §3.1).",
        "required": ["error", "request_id"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message", "details"],
                "properties": {
                    "type": {"type": "string", "enum": list(ERROR_TYPES)},
                    "message": {"type": "string"},
                    "details": {
                        "type": "array",
                        "description": "for invalid_input and invalid_output: one `{path, message}` per "
                                       "problem; for rate_limited by a limit of the agents file: "
                                       "`[{limit, scope, quota, window}]`",
                        "items": {},
                    },
                },
            },
            "request_id": {"type": "string"},
        },
    }


def _error_response(status: int, description: str | None = None, types: list[str] | None = None) -> dict[str, Any]:
    if description is None:
        description = ERROR_RESPONSES[status][1]
    if types is None:
        types = [c.type for c in ERROR_CLASSES if c.status == status]
    schema: dict[str, Any] = {
        "allOf": [
            {"$ref": COMPONENTS_PREFIX + ERROR},
            {"properties": {"error": {"properties": {"type": {"enum": types}}}}},
        ]
    }
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if status == 401:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}, "description": (
            '`Bearer` (no credentials), `Bearer error="invalid_token", error_description="…"` (RFC 6750); '
            'with `auth.jwt` also `resource_metadata="<origin>/.well-known/oauth-protected-resource"` (RFC 9728)')}
    elif status == 403:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}, "description": (
            '`Bearer error="insufficient_scope"` (RFC 6750), with `error_description` for a missing scope')}
    elif status == 405:
        headers["Allow"] = {"schema": {"type": "string"}, "description": "the methods the path accepts"}
    elif status == 409:
        headers["Retry-After"] = {"schema": {"type": "string"}, "description": "`1`: retry in a second"}
    elif status == 429:
        headers["Retry-After"] = {"schema": {"type": "string"}, "description": "whole seconds to wait (≥ 1)"}
        headers.update(_rate_headers())
    elif status == 503:
        headers["Retry-After"] = {"schema": {"type": "string"},
                                  "description": "seconds to wait, when the limits store or the token issuer is the cause"}
    return {"description": description, "headers": headers,
            "content": {"application/json": {"schema": schema}}}


def _job_error_response(name: str) -> dict[str, Any]:
    """A JOB_ERROR_RESPONSES entry: its status's error, in the job routes' words."""
    status, description = JOB_ERROR_RESPONSES[name]
    resp = _error_response(status, description, _JOB_ERROR_TYPES.get(name))
    if name == "JobFinished":  # not the Idempotency-Key's 409: nothing to retry
        del resp["headers"]["Retry-After"]
    return resp


def _trace_component() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["step_name", "usage", "attempts", "duration", "model", "request_id"],
        "properties": {
            "step_name": {"type": "string", "description": "the agent's name"},
            "usage": {
                "type": "object",
                "description": "tokens summed over every attempt",
                "required": ["prompt", "completion", "total"],
                "properties": {
                    "prompt": {"type": "integer", "minimum": 0},
                    "completion": {"type": "integer", "minimum": 0},
                    "total": {"type": "integer", "minimum": 0},
                },
            },
            "attempts": {"type": "integer", "minimum": 1, "description": "model calls, re-asks and retries included"},
            "duration": {"type": "string", "description": 'wall time, written as Go prints a duration ("850ms", "1.2s")'},
            "model": {"type": "string"},
            "request_id": {"type": "string"},
        },
    }


def _agent_info_component() -> dict[str, Any]:
    schema_or_null = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    name_or_null = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {
        "type": "object",
        "required": ["name", "endpoint", "model", "provider"],
        "properties": {
            "name": {"type": "string"},
            "endpoint": {"type": "string"},
            "model": {"type": "string"},
            "provider": {"type": "string"},
            "description": {"type": "string"},
            "input_type": name_or_null,
            "output_type": name_or_null,
            "input_schema": {"type": "object"},
            "output_schema": schema_or_null,
        },
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
            "content": {"application/json": {"schema": schema}}}


def _errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{ERROR_RESPONSES[s][0]}"} for s in statuses}


def _rate_headers() -> dict[str, Any]:
    return {
        "RateLimit-Policy": {"schema": {"type": "string"}, "description": (
            "the requests limits of this call (draft-ietf-httpapi-ratelimit-headers-10), e.g. "
            '`"client";q=600;w=60, "agent";q=1000;w=60`')},
        "RateLimit": {"schema": {"type": "string"}, "description": (
            'where they stand: remaining calls `r` and seconds until the window frees some `t`, e.g. '
            '`"client";r=412;t=37, "agent";r=950;t=12`')},
    }


def _restricted(config: Config, name: str) -> bool:
    """Whether auth can refuse a call of agent `name` with 403: an allowlist of
    `auth.keys` leaves it out, or `auth.jwt` has a `scope_prefix`."""
    auth = config.auth
    if auth.jwt is not None and auth.jwt.scope_prefix:
        return True
    return any(k.agents is not None and name not in k.agents for k in auth.keys)


def _limit_sets(config: Config, agent: CompiledAgent) -> list[LimitSet]:
    """Every limit set that can apply to a call of `agent` (some client's, or the agent's)."""
    auth = config.auth
    sets = [config.limits.default, agent.assistant.limits, *(k.limits for k in auth.keys),
            auth.jwt.limits if auth.jwt is not None else None]
    return [s for s in sets if s]


def _limited(config: Config, agent: CompiledAgent) -> bool:
    return bool(_limit_sets(config, agent))


def _request_limited(config: Config, agent: CompiledAgent) -> bool:
    """Whether a requests limit can apply: then the answers carry RateLimit-Policy and RateLimit."""
    return any(s.requests is not None for s in _limit_sets(config, agent))


def _call_statuses(base: tuple[int, ...], config: Config, agent: CompiledAgent, auth: Auth) -> tuple[int, ...]:
    out = []
    for s in base:
        if s == 401 and auth == "none":
            continue
        if s == 403 and not _restricted(config, agent.assistant.name):
            continue
        if s == 429 and base is not AGENT_CALL_STATUSES and not _limited(config, agent):
            continue
        out.append(s)
    return tuple(out)


def _ok(schema: dict[str, Any], description: str, config: Config, agent: CompiledAgent,
        media: str = "application/json") -> dict[str, Any]:
    """A 200 answer of an agent operation: with the RateLimit headers when a requests limit applies."""
    resp = _json(schema, description)
    if media != "application/json":
        resp["content"] = {media: resp["content"]["application/json"]}
    if _request_limited(config, agent):
        resp["headers"] = {**resp["headers"], **_rate_headers()}
    return resp


IDEMPOTENCY_PARAMETER = "#/components/parameters/Idempotency-Key"
IDEMPOTENCY_KEY_PATTERN = r'^(?:"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){1,255}"|[\x21\x23-\x7e]{1,255})$'


def _idempotency_parameter() -> dict[str, Any]:
    return {
        "name": "Idempotency-Key", "in": "header", "required": False,
        "description": ("one value per operation, sent again on its retries (SPEC §9.4): a quoted string "
                        "or a bare value, 1-255 printable ASCII characters. The first request runs; a "
                        "repeat with the same body gets its stored answer (`Idempotency-Replayed: true`), "
                        "409 while it runs, 422 `idempotency_key_reused` with another body. Per client and "
                        "route, kept 24 h; 5xx answers are not kept."),
        # Exactly what aiwfd.http.idempotency.parse_key takes: an sf-string of 1-255
        # characters (`\"` and `\\` escaped), or a bare value without spaces or quotes.
        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
    }


def _replayable(resp: dict[str, Any]) -> dict[str, Any]:
    """A 200 that may be the stored answer of an earlier request with the same Idempotency-Key."""
    resp["headers"] = {**resp["headers"], "Idempotency-Replayed": {
        "schema": {"type": "string", "enum": ["true"]},
        "description": "present when this is the stored answer of an earlier request with the same "
                       "Idempotency-Key (no model was called)"}}
    return resp


def _agent_operation(agent: CompiledAgent, auth: Auth, config: Config) -> dict[str, Any]:
    a = agent.assistant
    statuses = _call_statuses(AGENT_CALL_STATUSES, config, agent, auth)
    envelope = {
        "type": "object",
        "required": ["data", "trace"],
        "properties": {"data": data_schema(agent), "trace": {"$ref": COMPONENTS_PREFIX + TRACE}},
    }
    in_name = a.input_type_name or "any JSON object"
    out_name = a.output_type_name or "plain text"
    lines = [a.description] if a.description else []
    lines.append(f"Input: `{in_name}`. Output: `{out_name}`. Model: `{a.model}`"
                 f" (provider `{agent.provider.name}`), at most {a.max_attempts} model "
                 f"call{'s' if a.max_attempts != 1 else ''} per request.")
    op: dict[str, Any] = {
        "operationId": a.name,
        "summary": a.description.strip().splitlines()[0][:120] if a.description else f"Call the agent {a.name}",
        "description": "\n\n".join(lines),
        "tags": ["agents"],
        "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}, {"$ref": IDEMPOTENCY_PARAMETER}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": type_schema(a.input_type, agent.input_schema)}},
        },
        "responses": {"200": _replayable(_ok(envelope, f"the validated answer of {a.name}", config, agent)),
                      **_errors(statuses)},
    }
    if auth == "required":
        op["security"] = [{"apiKey": []}, {"bearer": []}]
    else:
        # Optional: `{}` is the requirement "nothing".
        op["security"] = [{}, {"apiKey": []}, {"bearer": []}]
    return op


def _security(auth: Auth) -> list[dict[str, Any]]:
    if auth == "required":
        return [{"apiKey": []}, {"bearer": []}]
    return [{}, {"apiKey": []}, {"bearer": []}]


def _envelope(agent: CompiledAgent) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "trace"],
        "properties": {"data": data_schema(agent), "trace": {"$ref": COMPONENTS_PREFIX + TRACE}},
    }


STREAM_EVENTS = """Server-sent events, each `event: <name>` and one `data:` line of JSON:

- `start` `{"request_id", "agent", "model"}`
- `delta` `{"text"}`: the next piece of the model's raw output
- `patch` `[op, …]` (`aiwfd-Patch`): how the output parsed so far changed (object outputs only)
- `retry` `{"attempt", "errors"}`: the last output failed; discard what came before (the next `patch` starts from `null`)
- `result` `{"data", "trace"}`: the validated answer, as `POST /agent/{name}` answers it; the stream ends
- `error` `{"error": {"type", "message", "details"}, "request_id"}`: terminal, the error the plain call would answer

and a `: keep-alive` comment line every 15 s (AIWF_SSE_KEEPALIVE).

Applying every `patch` in order to `null` gives the output parsed so far: `add` and `replace` as in
RFC 6902 (path `""` is the whole document; `/items/3` with 3 the array's length adds an element),
`append` concatenates `value` to the string at `path`. Paths are RFC 6901 JSON Pointers (`~1` is `/`,
`~0` is `~`). Strings, arrays and objects are sent as they grow; a key, number, `true`, `false` or
`null` still being written is left out until it ends. Optional fields sent as `null` never appear, as
in `result`. Each byte of the output is sent at most once in `patch`
besides its `delta`, so a stream costs what its answer costs."""

STREAM_EVENT_NAMES: tuple[str, ...] = ("start", "delta", "patch", "retry", "result", "error")
PATCH = "aiwfd-Patch"


def _patch_component() -> dict[str, Any]:
    return {
        "type": "array",
        "description": ("The data of a `patch` event (SPEC §7.4): applied in order to the document so far "
                        "(`null` at the start of each attempt), the ops give the output parsed so far."),
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["op", "path", "value"],
            "additionalProperties": False,
            "properties": {
                "op": {"type": "string", "enum": ["add", "replace", "append"],
                       "description": "`add`, `replace`: RFC 6902; `append`: concatenate `value` to the "
                                      "string at `path`"},
                "path": {"type": "string", "pattern": "^(/([^~/]|~[01])*)*$",
                         "description": 'an RFC 6901 JSON Pointer; `""` is the whole document'},
                "value": {"description": "the value to put at `path`; for `append`, the string to add"},
            },
        },
    }


def _stream_event(agent: CompiledAgent) -> dict[str, Any]:
    """One server-sent event. OpenAPI 3.1 has no schema for a stream as a whole:
    the media type's schema describes one event (what OpenAPI 3.2 calls
    `itemSchema`), as tools read it, and `contentSchema` says what each event's
    `data` line holds once parsed."""
    text = {"type": "string"}
    data: dict[str, Any] = {
        "start": {"type": "object", "required": ["request_id", "agent", "model"],
                  "properties": {"request_id": text, "agent": text, "model": text}},
        "delta": {"type": "object", "required": ["text"], "properties": {"text": text}},
        "patch": {"$ref": COMPONENTS_PREFIX + PATCH},
        "retry": {"type": "object", "required": ["attempt", "errors"],
                  "properties": {"attempt": {"type": "integer", "minimum": 2},
                                 "errors": {"type": "array", "items": {
                                     "type": "object", "required": ["path", "message"],
                                     "properties": {"path": text, "message": text}}}}},
        "result": _envelope(agent),
        "error": {"$ref": COMPONENTS_PREFIX + ERROR},
    }
    return {
        "type": "object",
        "description": "one server-sent event; `data` is one line of JSON",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": list(STREAM_EVENT_NAMES)},
            "data": {"type": "string", "contentMediaType": "application/json"},
        },
        "oneOf": [
            {"properties": {"event": {"const": name},
                            "data": {"contentMediaType": "application/json", "contentSchema": data[name]}}}
            for name in STREAM_EVENT_NAMES
        ],
    }


def _stream_operation(agent: CompiledAgent, auth: Auth, config: Config) -> dict[str, Any]:
    a = agent.assistant
    statuses = _call_statuses(STREAM_BATCH_STATUSES, config, agent, auth)
    return {
        "operationId": f"{a.name}.stream",
        "summary": f"Call the agent {a.name}, streamed as server-sent events",
        "description": (f"The same call as `POST /agent/{a.name}`, answered as it is generated. Errors found "
                        "before the model is called are ordinary JSON errors with their status; later "
                        "ones are an `error` event.\n\n" + STREAM_EVENTS),
        "tags": ["agents"],
        "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": type_schema(a.input_type, agent.input_schema)}},
        },
        "responses": {
            "200": _ok(_stream_event(agent), STREAM_EVENTS, config, agent, "text/event-stream"),
            **_errors(statuses),
        },
        "security": _security(auth),
    }


def _batch_operation(agent: CompiledAgent, auth: Auth, config: Config) -> dict[str, Any]:
    a = agent.assistant
    batch_max, concurrency = config.server.batch_max, config.server.batch_concurrency
    statuses = _call_statuses(BATCH_STATUSES, config, agent, auth)
    body = {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        # An input that does not fit is not refused: its result is its error (SPEC §7.5).
        # So any value is accepted; the first branch says what a good one is.
        "properties": {"inputs": {"type": "array", "maxItems": batch_max,
                                  "items": {"anyOf": [type_schema(a.input_type, agent.input_schema),
                                                      {"description": "anything else: that input's result "
                                                                      "is its error"}]}}},
    }
    results = {
        "type": "object",
        "required": ["results"],
        "properties": {"results": {
            "type": "array",
            "description": "one item per input, in input order",
            "items": {"anyOf": [_envelope(agent), {"$ref": COMPONENTS_PREFIX + ITEM_ERROR}]},
        }},
    }
    return {
        "operationId": f"{a.name}.batch",
        "summary": f"Call the agent {a.name} on many inputs",
        "description": (f"At most {batch_max} inputs (`server.batch_max`), at most {concurrency} answered at "
                        "once (`server.batch_concurrency`). Each result is what `POST /agent/"
                        f"{a.name}` would answer for that input: `{{\"data\", \"trace\"}}`, or "
                        "`{\"error\"}` without failing the others. A body without an `inputs` array, or "
                        "over the limit, is a 422." + (
                            " Each input counts against the limits like one call; a batch the window "
                            "cannot take whole is refused whole (429), and no more inputs run at once "
                            "than the narrowest concurrency limit allows." if _limited(config, agent) else "")),
        "tags": ["agents"],
        "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}, {"$ref": IDEMPOTENCY_PARAMETER}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": _replayable(_ok(results, "one result per input, in input order", config, agent)),
                      **_errors(statuses)},
        "security": _security(auth),
    }


def _item_error_component() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "The error of one input of a batch: the §3.1 error object, without a request id "
                       "of its own (the batch's is in X-Request-ID).",
        "required": ["error"],
        "properties": {"error": _error_component()["properties"]["error"]},
    }


# --------------------------------------------------------------------------
# Jobs (SPEC §9.1)

JOB = "aiwfd-Job"
# aiwfd.jobs.store.JobStatus (tests/http/test_openapi.py keeps them equal).
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "canceled")
# What `POST /agent/{name}/jobs` can answer as an error: what the plain call
# finds before the model is called; 409 for its Idempotency-Key; 429 only when
# a limit applies (no model is called: no provider 429).
JOB_SUBMIT_STATUSES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 503)
# Exactly the cursors aiwfd.jobs.store.encode_cursor makes for 1-18 digit
# sequence numbers: base64url (no padding) of "j1:<digits>". "ajE6" is "j1:";
# each 4 characters are 3 digits, a 3- or 2-character tail 2 digits or 1.
_CURSOR_3 = r"(?:[MN][DTjz]|O[DT])[AEIMQUYcgk][wxyz0-5]"
_CURSOR_TAIL = r"(?:[MN][DTjz]|O[DT])[AEIMQUYcgk]|[MN][AQgw]|O[AQ]"
CURSOR_PATTERN = rf"^ajE6(?:{_CURSOR_3}){{0,5}}(?:{_CURSOR_3}|{_CURSOR_TAIL})$"
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
WEBHOOK_URL_MAX = 2048  # aiwfd.http.jobs._MAX_URL

# name -> (status, description): the job routes' own wording of an error status.
JOB_ERROR_RESPONSES: dict[str, tuple[int, str]] = {
    "JobNotFound": (404, "`not_found`: no such job: it is another client's, or it finished longer ago than "
                         "`jobs.retention`"),
    "JobFinished": (409, "`conflict`: the job already succeeded, failed or was canceled; only a queued or "
                         "running job can be canceled"),
    "InvalidJobQuery": (400, "`invalid_request`: `status` is not a job status, `limit` is not a whole number "
                             "from 1 to 100, `cursor` is not a `next_cursor` of a previous page, or an "
                             "unknown query parameter"),
}
# name -> the error types it admits (default: every type of its status).
_JOB_ERROR_TYPES = {"InvalidJobQuery": ["invalid_request"]}


def _job_component() -> dict[str, Any]:
    time = {"type": "string", "format": "date-time"}
    null = {"type": "null"}
    return {
        "type": "object",
        "description": ("A job (SPEC §9.1): what `POST /agent/{name}/jobs` answers and `GET /jobs/{id}` "
                        "reads; a webhook's `data` is this without `webhook`. Times are RFC 3339, UTC, "
                        "in milliseconds."),
        "required": ["id", "agent", "status", "created_at", "started_at", "finished_at", "attempts",
                     "result", "error", "webhook"],
        "properties": {
            "id": {"type": "string", "description": "unguessable; the submission's `Location` is `/jobs/{id}`"},
            "agent": {"type": "string"},
            "status": {"type": "string", "enum": list(JOB_STATUSES),
                       "description": "`queued` → `running` → `succeeded` | `failed` | `canceled`"},
            "created_at": time,
            "started_at": {"anyOf": [time, null], "description": "when the latest run started; null while queued"},
            "finished_at": {"anyOf": [time, null], "description": "null until the job succeeds, fails or is canceled"},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "runs started: 0 while queued, more than 1 after a crash"},
            "result": {"anyOf": [{"type": "object", "required": ["data", "trace"],
                                  "properties": {"data": {"description": "the agent's validated output, as "
                                                                         "`POST /agent/{name}` answers it"},
                                                 "trace": {"$ref": COMPONENTS_PREFIX + TRACE}}}, null],
                       "description": "`{\"data\", \"trace\"}` once succeeded, else null"},
            "error": {"anyOf": [_error_component()["properties"]["error"], null],
                      "description": "the §3.1 error object once failed (or canceled with a cause), else null"},
            "webhook": {"anyOf": [{
                "type": "object",
                "required": ["status", "attempts", "last_status"],
                "properties": {
                    "status": {"type": "string", "enum": ["pending", "delivered", "failed"],
                               "description": "`pending` until the delivery is done; `failed` also after a "
                                              "410 or once `jobs.webhook.retry_for` ran out"},
                    "attempts": {"type": "integer", "minimum": 0},
                    "last_status": {"anyOf": [{"type": "integer"}, null],
                                    "description": "the HTTP status of the latest answer; null: none yet"},
                },
            }, null], "description": "the delivery of the job's end; null for a job without a webhook"},
        },
    }


def _agent_job(agent: CompiledAgent, **properties: Any) -> dict[str, Any]:
    """The job document of one agent: `result.data` typed by its output."""
    return {"allOf": [{"$ref": COMPONENTS_PREFIX + JOB},
                      {"properties": {"agent": {"const": agent.assistant.name},
                                      "result": {"anyOf": [_envelope(agent), {"type": "null"}]},
                                      **properties}}]}


def _regex_literal(text: str) -> str:
    """`text` as a regular expression matching itself, alike in ECMA-262 and Python (no `\\-`, `\\/`)."""
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in text)


def _job_operation(agent: CompiledAgent, auth: Auth, config: Config) -> dict[str, Any]:
    a = agent.assistant
    statuses = _call_statuses(JOB_SUBMIT_STATUSES, config, agent, auth)
    parameters: list[dict[str, Any]] = [{"$ref": "#/components/parameters/X-Request-ID"},
                                        {"$ref": IDEMPOTENCY_PARAMETER}]
    prefixes = config.jobs.allow_request_webhooks
    if prefixes:  # else a Webhook-URL is a 422 whatever it says: not a parameter
        parameters.append({
            "name": "Webhook-URL", "in": "header", "required": False,
            "description": ("this job's own webhook, instead of `jobs.webhook`: a URL under one of "
                            + ", ".join(f"`{p}`" for p in prefixes) + " (`jobs.allow_request_webhooks`; "
                            "else 422). One header; the URL is never shown back."),
            "schema": {"type": "string", "maxLength": WEBHOOK_URL_MAX,
                       "pattern": "^(?:" + "|".join(_regex_literal(p) for p in prefixes) + ")"},
        })
    accepted = _ok(_agent_job(agent), "accepted: the job, stored before this answer", config, agent)
    accepted["headers"] = {**accepted["headers"], "Location": {
        "required": True, "schema": {"type": "string", "pattern": "^/jobs/"},
        "description": "`/jobs/{id}`: where the job is read (`GET`) and canceled (`DELETE`)"}}
    # The job's own operations, for generated clients and tools that follow links.
    accepted["links"] = {
        "GetJob": {"operationId": "jobs.get", "parameters": {"id": "$response.body#/id"},
                   "description": "read the job: its status, then its result or error"},
        "CancelJob": {"operationId": "jobs.cancel", "parameters": {"id": "$response.body#/id"},
                      "description": "cancel the job while it is queued or running"},
    }
    return {
        "operationId": f"{a.name}.jobs",
        "summary": f"Run the agent {a.name} as a job",
        "description": (f"The call of `POST /agent/{a.name}`, run in the background: the same body, auth, "
                        "limits and checks, and what fails before the model is called fails now, with its "
                        "status. Accepted: 202, `Location: /jobs/{id}` and the job (`queued`); poll "
                        "`GET /jobs/{id}`, or have its end sent to a webhook (Standard Webhooks)."),
        "tags": ["jobs"],
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": type_schema(a.input_type, agent.input_schema)}},
        },
        "responses": {"202": _replayable(accepted), **_errors(statuses)},
        "security": _security(auth),
    }


def _job_responses(ok: dict[str, Any], auth: Auth, *named: str) -> dict[str, Any]:
    """`ok` and the errors of a job route: 401 (with auth), the named JOB_ERROR_RESPONSES, 500, 503."""
    out: dict[str, Any] = {"200": ok}
    errors = {s: {"$ref": f"#/components/responses/{ERROR_RESPONSES[s][0]}"}
              for s in (401, 500, 503) if s != 401 or auth != "none"}
    for name in named:
        errors[JOB_ERROR_RESPONSES[name][0]] = {"$ref": f"#/components/responses/{name}"}
    out.update({str(s): errors[s] for s in sorted(errors)})
    return out


def _job_paths(auth: Auth) -> dict[str, Any]:
    request_id = {"$ref": "#/components/parameters/X-Request-ID"}
    job_id = {"name": "id", "in": "path", "required": True, "description": "the job's `id`",
              "schema": {"type": "string", "pattern": JOB_ID_PATTERN}}
    job = {"$ref": COMPONENTS_PREFIX + JOB}
    page = {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "maxItems": 100, "items": job},
            "next_cursor": {"anyOf": [{"type": "string", "pattern": CURSOR_PATTERN}, {"type": "null"}],
                            "description": "pass as `cursor` for the next page; null on the last one"},
        },
    }
    # An empty value is the parameter left out (`?status=&agent=`): allowEmptyValue.
    query = [
        {"name": "status", "in": "query", "required": False, "allowEmptyValue": True,
         "description": "only the jobs in this status", "schema": {"type": "string", "enum": list(JOB_STATUSES)}},
        {"name": "agent", "in": "query", "required": False, "allowEmptyValue": True,
         "description": "only the jobs of this agent", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "required": False, "allowEmptyValue": True, "description": "jobs per page",
         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
        {"name": "cursor", "in": "query", "required": False, "allowEmptyValue": True,
         "description": "the `next_cursor` of the previous page (opaque)",
         "schema": {"type": "string", "pattern": CURSOR_PATTERN}},
    ]
    security = _security(auth)
    return {
        "/jobs": {"get": {
            "operationId": "jobs.list",
            "summary": "The client's jobs, newest first",
            "description": "Only the jobs this client submitted; a page at a time, `next_cursor` for the next.",
            "tags": ["jobs"],
            "parameters": [request_id, *query],
            "responses": _job_responses(_json(page, "a page of jobs"), auth, "InvalidJobQuery"),
            "security": security,
        }},
        "/jobs/{id}": {
            "get": {
                "operationId": "jobs.get",
                "summary": "A job: its status, and its result or error once finished",
                "description": "Only the client that submitted a job sees it; anyone else gets 404.",
                "tags": ["jobs"],
                "parameters": [request_id, job_id],
                "responses": _job_responses(_json(job, "the job"), auth, "JobNotFound"),
                "security": security,
            },
            "delete": {
                "operationId": "jobs.cancel",
                "summary": "Cancel a job",
                "description": ("A queued job never runs; a running one is stopped (its model call closed). "
                                "A finished job is a 409."),
                "tags": ["jobs"],
                "parameters": [request_id, job_id],
                "responses": _job_responses(
                    _json({"allOf": [job, {"properties": {"status": {"const": "canceled"}}}]},
                          "the job, `canceled`"), auth, "JobNotFound", "JobFinished"),
                "security": security,
            },
        },
    }


# --------------------------------------------------------------------------
# MCP (SPEC §10.1)

JSONRPC_REQUEST = "aiwfd-JSONRPCRequest"
JSONRPC_RESPONSE = "aiwfd-JSONRPCResponse"
MCP_METHODS = ("initialize", "notifications/initialized", "ping", "tools/list", "tools/call")
MCP_VERSIONS = ("2025-06-18", "2025-11-25")  # aiwfd.http.mcp.PROTOCOL_VERSIONS


def _jsonrpc_components() -> dict[str, Any]:
    jsonrpc = {"type": "string", "const": "2.0"}
    request_id = {"type": ["string", "integer"]}
    return {
        JSONRPC_REQUEST: {
            "type": "object",
            "description": "A JSON-RPC 2.0 request, or a notification (no `id`).",
            "required": ["jsonrpc", "method"],
            "properties": {
                "jsonrpc": jsonrpc,
                "id": request_id,
                "method": {"type": "string", "description": "one of " + ", ".join(f"`{m}`" for m in MCP_METHODS)},
                "params": {"type": ["object", "null"]},
            },
        },
        JSONRPC_RESPONSE: {
            "type": "object",
            "description": "A JSON-RPC 2.0 response: a `result`, or an `error`.",
            "required": ["jsonrpc", "id"],
            "properties": {
                "jsonrpc": jsonrpc,
                "id": {"type": ["string", "integer", "null"]},
                "result": {"type": "object"},
                "error": {"type": "object", "required": ["code", "message"],
                          "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}}},
            },
            "oneOf": [{"required": ["result"]}, {"required": ["error"]}],
        },
    }


def _mcp_operation(auth: Auth) -> dict[str, Any]:
    rpc = {"$ref": COMPONENTS_PREFIX + JSONRPC_RESPONSE}
    # 403: a browser's Origin that is neither this server's nor allowed by server.cors.
    statuses = tuple(s for s in (401, 403, 408, 413, 415, 500, 503) if s != 401 or auth != "none")
    return {
        "operationId": "mcp.request",
        "summary": "The agents as MCP tools (Model Context Protocol, Streamable HTTP, stateless)",
        "description": ("One JSON-RPC message per request, no session: `initialize`, "
                        "`notifications/initialized`, `ping`, `tools/list` and `tools/call` (protocol "
                        "revisions 2025-06-18 and 2025-11-25). Every agent is a tool whose `inputSchema` is "
                        "its input schema; `tools/call` runs it as `POST /agent/{name}` does, and a failed "
                        "call is a result with `isError: true`. `GET /mcp` is 405."),
        "tags": ["mcp"],
        "parameters": [
            {"$ref": "#/components/parameters/X-Request-ID"},
            {"name": "MCP-Protocol-Version", "in": "header", "required": False,
             "description": "the revision `initialize` agreed on; another is a 400 (but on `initialize`)",
             "schema": {"type": "string", "enum": list(MCP_VERSIONS)}},
        ],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": COMPONENTS_PREFIX + JSONRPC_REQUEST},
            "examples": {"tools/list": {"value": {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}}},
        }}},
        "responses": {
            "200": _json(rpc, "the JSON-RPC response: a `result`, or an `error` (an unknown method or tool, "
                              "invalid params)"),
            "202": {"description": "a notification: accepted, no body",
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}},
            "400": _json({"anyOf": [rpc, {"$ref": COMPONENTS_PREFIX + ERROR}]},
                         "a JSON-RPC error: the body is not JSON (`-32700`), not one JSON-RPC message "
                         "(`-32600`; batches are not supported), `params` not an object (`-32602`), or an "
                         "unsupported `MCP-Protocol-Version` (`-32600`); or the §3.1 `invalid_json` of a "
                         "charset that is not UTF-8"),
            **_errors(statuses),
        },
        "security": _security(auth),
    }


# --------------------------------------------------------------------------
# The OpenAI-compatible API (SPEC §10.2)

OPENAI_ERROR = "aiwfd-OpenAIError"
CHAT_CHUNK = "aiwfd-ChatCompletionChunk"
# A chat completion is a call of an agent (no Idempotency-Key: no 409).
CHAT_STATUSES = (400, 401, 403, 404, 408, 413, 415, 422, 429, 500, 502, 503, 504)
MODELS_STATUSES = (401, 500, 503)
MODEL_STATUSES = (401, 404, 500, 503)


def _openai_error_component() -> dict[str, Any]:
    null = {"type": "null"}
    return {
        "type": "object",
        "description": "Every error of `/v1`: OpenAI's shape, so that its SDKs raise their usual exceptions.",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "OpenAI's kind of error: `invalid_request_error` "
                                                           "(4xx) or `server_error` (5xx)"},
                "param": {"anyOf": [{"type": "string"}, null], "description": "the request field at fault"},
                "code": {"type": "string", "enum": list(ERROR_TYPES), "description": "the §3.1 error type"},
            },
        }},
    }


def _openai_response_name(status: int) -> str:
    return "OpenAI" + ERROR_RESPONSES[status][0]


def _openai_error_response(status: int) -> dict[str, Any]:
    resp = _error_response(status)
    types = [c.type for c in ERROR_CLASSES if c.status == status]
    resp["content"] = {"application/json": {"schema": {"allOf": [
        {"$ref": COMPONENTS_PREFIX + OPENAI_ERROR},
        {"properties": {"error": {"properties": {"code": {"enum": types}}}}},
    ]}}}
    return resp


def _openai_errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{_openai_response_name(s)}"} for s in statuses}


def _chat_chunk_component() -> dict[str, Any]:
    null = {"type": "null"}
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": "chat.completion.chunk"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "delta"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "delta": {"type": "object", "properties": {"role": {"type": "string"},
                                                               "content": {"type": "string"}}},
                    "finish_reason": {"anyOf": [{"type": "string"}, null]},
                }}},
            "usage": {"anyOf": [_usage(), null]},
        },
    }


def _usage() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    return {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "description": "tokens summed over every attempt",
            "properties": {"prompt_tokens": count, "completion_tokens": count, "total_tokens": count}}


def _openai_paths(compiled: Compiled, auth: Auth) -> dict[str, Any]:
    config, names = compiled.config, sorted(compiled.agents)
    model_id: dict[str, Any] = {"type": "string", "enum": names} if names else {"type": "string"}
    skip = {401} if auth == "none" else set()
    if not any(_restricted(config, n) for n in names):
        skip.add(403)
    one_model = {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": model_id, "object": {"type": "string", "const": "model"},
                       "created": {"type": "integer"}, "owned_by": {"type": "string", "const": "aiwfd"}}}
    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "const": "list"},
            "data": {"type": "array", "items": one_model},
        },
    }
    request = {
        "type": "object",
        "required": ["model", "messages"],
        "description": "The agent's own settings (model, prompt, temperature, schema) stand; other fields are ignored.",
        "properties": {
            "model": {**model_id, "description": "the agent's name"},
            "messages": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["role"],
                "properties": {"role": {"type": "string"},
                               "content": {"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]}}},
                "description": ("the input is the last `user` message's content, parsed as JSON (plain text "
                                "when the input type has exactly one required string field, which receives it)")},
            "stream": {"type": "boolean", "default": False},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        },
    }
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string", "pattern": "^chatcmpl-", "description": "`chatcmpl-<request id>`"},
            "object": {"type": "string", "const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "message": {"type": "object", "required": ["role", "content"],
                                "properties": {"role": {"type": "string", "const": "assistant"},
                                               "content": {"type": "string", "description": (
                                                   "the validated output as JSON (the text, for an agent "
                                                   "without output type)")}}},
                    "finish_reason": {"type": "string"},
                }}},
            "usage": _usage(),
        },
    }
    event = {
        "type": "object",
        "description": ("one server-sent event: `data:` a `chat.completion.chunk` (`aiwfd-ChatCompletionChunk`), "
                        "the last one `data: [DONE]`; an error once the 200 is sent (a call outlasting the "
                        "keep-alive interval) is `data: {\"error\": …}` (`aiwfd-OpenAIError`)"),
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"type": "string", "const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [{"$ref": COMPONENTS_PREFIX + CHAT_CHUNK},
                                         {"$ref": COMPONENTS_PREFIX + OPENAI_ERROR}]}}]}},
    }
    ok = _json(completion, "a `chat.completion`; with `stream: true`, server-sent `chat.completion.chunk` "
                           "events of the validated answer, a usage chunk with `stream_options.include_usage`, "
                           "then `data: [DONE]`")
    ok["content"]["text/event-stream"] = {"schema": event}
    security = _security(auth)
    return {
        "/v1/models": {"get": {
            "operationId": "openai.listModels",
            "summary": "The agents as OpenAI models",
            "tags": ["openai"],
            "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}],
            "responses": {"200": _json(models, "one model per agent"),
                          **_openai_errors(tuple(s for s in MODELS_STATUSES if s not in skip))},
            "security": security,
        }},
        "/v1/models/{model}": {"get": {
            "operationId": "openai.retrieveModel",
            "summary": "One agent as an OpenAI model",
            "description": "404 for an agent the config does not have or the client may not call.",
            "tags": ["openai"],
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"$ref": "#/components/parameters/X-Request-ID"}],
            "responses": {"200": _json(one_model, "the agent"),
                          **_openai_errors(tuple(s for s in MODEL_STATUSES if s not in skip))},
            "security": security,
        }},
        "/v1/chat/completions": {"post": {
            "operationId": "openai.createChatCompletion",
            "summary": "Call an agent as an OpenAI chat completion",
            "description": ("`model` names the agent. The call is `POST /agent/{name}`'s (auth, limits, "
                            "validation, re-ask); errors have OpenAI's shape, with the §3.1 status and "
                            "`code` the §3.1 type."),
            "tags": ["openai"],
            "parameters": [{"$ref": "#/components/parameters/X-Request-ID"}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": ok,
                          **_openai_errors(tuple(s for s in CHAT_STATUSES if s not in skip))},
            "security": security,
        }},
    }


def _service_operation(op_id: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    # "service." cannot begin an agent name, so no agent (say one named
    # `health`) can take a service operation's id.
    return {"operationId": f"service.{op_id}", "summary": summary, "tags": ["service"], "security": [],
            "responses": {**responses, **{k: v for k, v in _errors(SERVICE_STATUSES).items() if k not in responses}},
            **extra}


def build_openapi(compiled: Compiled, auth: Auth = "unknown") -> dict[str, Any]:
    """The whole document; `auth` as in the module docstring."""
    agents = compiled.agents
    names = sorted(agents)
    config = compiled.config
    jwt = config.auth.jwt
    if config.auth:  # `auth:` in the file: credentials are required, whatever API_KEY says
        auth = "required"
    schemas: dict[str, Any] = {
        key: rewrite_refs(typedsl.schema(node)) for key, node in compiled.config.types.items()
    }
    schemas[ERROR] = _error_component()
    schemas[TRACE] = _trace_component()
    schemas[AGENT_INFO] = _agent_info_component()
    schemas[ITEM_ERROR] = _item_error_component()
    schemas[PATCH] = _patch_component()
    schemas[JOB] = _job_component()
    schemas.update(_jsonrpc_components())
    schemas[OPENAI_ERROR] = _openai_error_component()
    schemas[CHAT_CHUNK] = _chat_chunk_component()

    paths: dict[str, Any] = {}
    for name in names:
        paths[f"/agent/{name}"] = {"post": _agent_operation(agents[name], auth, config)}
        # The same call streamed (SPEC §7.4) and on many inputs (§7.5).
        paths[f"/agent/{name}/stream"] = {"post": _stream_operation(agents[name], auth, config)}
        paths[f"/agent/{name}/batch"] = {"post": _batch_operation(agents[name], auth, config)}
        # As a job (SPEC §9.1): one operation per agent too, its result typed.
        paths[f"/agent/{name}/jobs"] = {"post": _job_operation(agents[name], auth, config)}
    paths.update(_job_paths(auth))
    paths["/mcp"] = {"post": _mcp_operation(auth)}
    paths.update(_openai_paths(compiled, auth))

    health = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok", "draining"]},
                       "version": {"type": "string"}, "agents": {"type": "integer", "minimum": 0}},
    }
    paths["/health"] = {"get": _service_operation(
        "health", "Liveness: 200 while serving, 503 while draining",
        {"200": _json(health, "serving"), "503": _json(health, "draining: the instance is shutting down")},
    )}
    ready = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ready", "unready"]},
                       "store": {"type": "string", "description": "`memory`, or the Redis URL without its password"},
                       "reason": {"type": "string", "description": "why the instance is not ready"}},
    }
    paths["/health/ready"] = {"get": _service_operation(
        "ready", "Readiness: 200 when the config is loaded, the token issuer's keys are (with auth.jwt) "
                 "and the limits store answers; 503 with the reason otherwise",
        {"200": _json(ready, "ready: `{\"status\": \"ready\", \"store\": …}`"),
         "503": _json(ready, "unready: `{\"status\": \"unready\", \"reason\": …}` (the store does not "
                             "answer, the issuer's keys are not loaded yet, or the server is shutting down)")},
    )}
    if jwt is not None:
        metadata = {
            "type": "object",
            "required": ["resource", "authorization_servers"],
            "properties": {"resource": {"type": "string"},
                           "authorization_servers": {"type": "array", "items": {"type": "string"}},
                           "bearer_methods_supported": {"type": "array", "items": {"type": "string"}},
                           "scopes_supported": {"type": "array", "items": {"type": "string"}},
                           "resource_name": {"type": "string"}},
        }
        paths["/.well-known/oauth-protected-resource"] = {"get": _service_operation(
            "protectedResource", "OAuth 2.0 protected resource metadata (RFC 9728): the issuer of the tokens "
                                 "this API takes, and its scopes",
            {"200": _json(metadata, "the metadata")},
        )}
    paths["/agents"] = {"get": _service_operation(
        "listAgents", "The agents of the running config, sorted by name",
        {"200": _json({"type": "object", "required": ["agents"],
                       "properties": {"agents": {"type": "array", "items": {"$ref": COMPONENTS_PREFIX + AGENT_INFO}}}},
                      "the agents")},
    )}
    if names:
        paths["/agent/{name}/schema"] = {"get": _service_operation(
            "agentSchema", "An agent's input and output JSON Schemas (draft 2020-12)",
            {"200": _json({"type": "object", "required": ["input", "output"],
                           "properties": {"input": {"type": "object"}, "output": {"type": "object"}}},
                          "`input`: the request body's schema; `output`: the schema of `data`"),
             **_errors((404,))},
            parameters=[{"name": "name", "in": "path", "required": True,
                         "schema": {"type": "string", "enum": names}}],
        )}
    paths["/openapi.json"] = {"get": _service_operation(
        "openapi", "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")})}
    paths["/metrics"] = {"get": _service_operation(
        "metrics", "Prometheus metrics (text exposition format)",
        {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}})}
    paths["/docs"] = {"get": _service_operation(
        "docs", "This API in Swagger UI (served locally, no CDN)",
        {"200": {"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}}})}

    auth_text = {
        "required": "Agent calls need the API key: `X-API-Key: <key>` or `Authorization: Bearer <key>`.",
        "none": "The server has no API_KEY set: agent calls need no key.",
        "unknown": "When the server has API_KEY set, agent calls need `X-API-Key: <key>` "
                   "or `Authorization: Bearer <key>`.",
    }[auth]
    if jwt is not None:
        auth_text += (f" A JWT from {jwt.issuer} (audience `{jwt.audience}`) is taken as "
                      "`Authorization: Bearer <token>` too"
                      + (f", with the scope `{jwt.scope_prefix}<agent>` or `{jwt.scope_prefix}*`"
                         if jwt.scope_prefix else "") + ".")
    schemes: dict[str, Any] = {
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "one of the keys in the server's API_KEY (comma-separated for rotation) "
                                  "or of the agents file's `auth.keys`"},
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "the same key as `Authorization: Bearer <key>`"
                                  + ("; or a JWT of the issuer (three base64url parts)" if jwt else "")},
    }
    if jwt is not None:
        schemes["bearer"]["bearerFormat"] = "JWT or API key"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "aiwfd agents",
            "version": __version__,
            "description": (f"Typed AI agents served by aiwfd {__version__}. "
                            "Each agent is `POST /agent/{name}`: the body is validated against its input "
                            "schema and the answer is `{\"data\", \"trace\"}`; `/agent/{name}/stream` "
                            "answers the same call as server-sent events and `/agent/{name}/batch` "
                            "takes many inputs at once; `/agent/{name}/jobs` runs the call in the background "
                            "(`/jobs`). Every error is "
                            "`{\"error\": {\"type\", \"message\", \"details\"}, \"request_id\"}`. "
                            "The agents are also MCP tools (`POST /mcp`) and OpenAI models (`/v1`, with "
                            "OpenAI's error shape). " + auth_text),
        },
        "tags": [{"name": "agents", "description": "one operation per agent"},
                 {"name": "jobs", "description": "an agent's call run in the background, read by its id"},
                 {"name": "mcp", "description": "the agents as Model Context Protocol tools"},
                 {"name": "openai", "description": "the agents as OpenAI models: chat completions"},
                 {"name": "service", "description": "health, readiness, discovery, docs and metrics (no key needed)"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {
                **{ERROR_RESPONSES[s][0]: _error_response(s) for s in sorted(ERROR_RESPONSES)},
                **{name: _job_error_response(name) for name in JOB_ERROR_RESPONSES},
                **{_openai_response_name(s): _openai_error_response(s)
                   for s in sorted({*CHAT_STATUSES, *MODELS_STATUSES})},
            },
            "headers": {"X-Request-ID": {
                "description": "the request id (the client's when it sent a sane one); the log has it too",
                "required": True, "schema": {"type": "string"}}},
            "parameters": {"X-Request-ID": {
                "name": "X-Request-ID", "in": "header", "required": False,
                "description": "an id for this request (`[A-Za-z0-9._:@/+=-]{1,128}`); a new one is made otherwise",
                "schema": {"type": "string"}},
                "Idempotency-Key": _idempotency_parameter()},
            "securitySchemes": schemes,
        },
    }
