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
                          "`Idempotency-Key` was used before with a different body"),
    429: ("RateLimited", "`rate_limited`: a limit of the agents file is reached (`details`: "
                         "`[{limit, scope, quota, window}]`), or the model provider kept answering 429 "
                         "after retries; `Retry-After` says when to try again"),
    500: ("InternalError", "`internal_error`: a bug; the server log has the traceback under the request id"),
    502: ("BadGateway", "`upstream_error`: the provider answered an error; or `invalid_output`: the "
                        "model's answer still failed the output schema after max_attempts (`details`: the last errors)"),
    503: ("Unavailable", "`unavailable`: the server is draining, the provider is unreachable, the limits "
                         "store does not answer (with `on_store_error: deny`), the idempotency key store does "
                         "not answer (a request with an `Idempotency-Key`), or the token issuer's keys "
                         "are not loaded yet"),
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


def _error_response(status: int) -> dict[str, Any]:
    name, description = ERROR_RESPONSES[status]
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

    paths: dict[str, Any] = {}
    for name in names:
        paths[f"/agent/{name}"] = {"post": _agent_operation(agents[name], auth, config)}
        # The same call streamed (SPEC §7.4) and on many inputs (§7.5).
        paths[f"/agent/{name}/stream"] = {"post": _stream_operation(agents[name], auth, config)}
        paths[f"/agent/{name}/batch"] = {"post": _batch_operation(agents[name], auth, config)}

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
                            "takes many inputs at once. Every error is "
                            "`{\"error\": {\"type\", \"message\", \"details\"}, \"request_id\"}`. " + auth_text),
        },
        "tags": [{"name": "agents", "description": "one operation per agent"},
                 {"name": "service", "description": "health, readiness, discovery, docs and metrics (no key needed)"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {ERROR_RESPONSES[s][0]: _error_response(s) for s in sorted(ERROR_RESPONSES)},
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
