"""Describing the API (SPEC §7.1, §4.2): GET /openapi.json, GET /agent/{name}/schema,
and openapi.json among the artifacts of `aiwfd compile` and of serving.

Every document must pass openapi-spec-validator (OpenAPI 3.1), and its schemas
must mean what the server does: the request body and the 200 envelope are
checked against real requests and answers with jsonschema, resolving the
document's own `$ref`s.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import re
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, get_args

import jsonschema
import pytest
from openapi_spec_validator import validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from aiwfd import errors as E
from aiwfd.spec.compiler import load_and_compile
from aiwfd.spec.openapi import CURSOR_PATTERN, JOB_STATUSES, STREAM_EVENT_NAMES
from aiwfd.errors import ConfigError
from aiwfd.jobs.store import JobStatus, decode_cursor, encode_cursor
from aiwfd.providers.mock import sample
from aiwfd.testing.fakeopenai import FakeOpenAI, Hold, Reply
from aiwfd.testing.inprocess import InProcess, fake_env, serve, write_config
from aiwfd.testing.processes import AiwfdProcess, run_cli
from aiwfd.testing.webhook_receiver import WebhookReceiver
from tests.conftest import CONFIGS, REPO

API_MOCK = CONFIGS / "api_mock.yaml"
KEY = "test-key-1"
DOC_ID = "urn:aiwfd:openapi"

# §3.1: every status and type a call of an agent can answer (405 cannot: POST is the route's method).
AGENT_ERRORS = {400: {"invalid_json", "invalid_request"}, 401: {"unauthorized"}, 404: {"not_found"}, 408: {"request_timeout"},
                409: {"conflict"}, 413: {"payload_too_large"}, 415: {"unsupported_media_type"},
                422: {"invalid_input", "idempotency_key_reused"},
                429: {"rate_limited"}, 500: {"internal_error"}, 502: {"upstream_error", "invalid_output"},
                503: {"unavailable"}, 504: {"upstream_timeout"}}
ALL_TYPES = {c.type for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.HTTPError)
             and c is not E.HTTPError}
REPORTS_KEY = "reports-secret-key"  # tests/configs/access.yaml's key_sha256 client
FRONTEND_KEY = "frontend-secret-key"  # and its key_env client
PLACEHOLDERS = {"@FAKE_URL@": "http://127.0.0.1:9/v1", "@DEAD_URL@": "http://127.0.0.1:9/v1",
                "@SLOW_URL@": "http://127.0.0.1:9/v1", "@PROMPT@": "a prompt",
                "@REPORTS_SHA256@": hashlib.sha256(REPORTS_KEY.encode()).hexdigest()}
# access.yaml's `key_env:` client.
CONFIG_ENV = {"FRONTEND_API_KEY": FRONTEND_KEY}


def key_env(compiled: Any) -> dict[str, str]:
    """A distinct key for every `key_env:` client of a config (two clients with one key stop the start)."""
    return {k.key_env: f"key-of-{k.name}" for k in compiled.config.auth.keys if k.key_env}


def all_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml")) + [REPO / "config.example.yaml"]


def materialise(path: Path, tmp: Path) -> Path:
    """The config with the placeholders some test configs carry filled in."""
    text = path.read_text(encoding="utf-8")
    if "@" not in text:
        return path
    for k, v in PLACEHOLDERS.items():
        text = text.replace(k, v)
    out = tmp / path.name
    out.write_text(text, encoding="utf-8")
    for sub in ("common",):  # imports are relative to the file
        if (path.parent / sub).is_dir() and not (tmp / sub).exists():
            (tmp / sub).symlink_to(path.parent / sub)
    return out


def pointer(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def validator_for(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for a schema inside `doc`, its `#/components/...` refs resolved in `doc`."""
    registry = Registry().with_resource(DOC_ID, DRAFT202012.create_resource(doc))
    wrapped = json.loads(json.dumps(schema).replace('"#/components/', f'"{DOC_ID}#/components/'))
    return jsonschema.Draft202012Validator(wrapped, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def response_schema(doc: dict[str, Any], op: dict[str, Any], status: int) -> dict[str, Any]:
    resp = op["responses"][str(status)]
    if "$ref" in resp:
        resp = pointer(doc, resp["$ref"])
    return resp["content"]["application/json"]["schema"]


async def get_json(srv: InProcess, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    async with srv.session.get(srv.url(path), **kw) as r:
        return r.status, dict(r.headers), await r.json()


# --------------------------------------------------------------------------
# Every config the project ships


def test_only_the_invalid_configs_are_skipped(tmp_path: Path) -> None:
    invalid = set()
    for path in all_configs():
        try:
            load_and_compile(str(materialise(path, tmp_path)))
        except ConfigError:
            invalid.add(path.name)
    assert all(name.endswith("_invalid.yaml") for name in invalid), invalid


@pytest.mark.parametrize("path", all_configs(), ids=lambda p: p.name)
async def test_openapi_json_of_every_config_validates(path: Path, tmp_path: Path) -> None:
    cfg = materialise(path, tmp_path)
    try:
        compiled = load_and_compile(str(cfg))
    except ConfigError:
        assert path.name.endswith("_invalid.yaml")
        pytest.skip(f"{path.name} is invalid on purpose")
    out = tmp_path / "artifacts"
    async with serve(cfg, env=key_env(compiled), mock=True, output_dir=str(out)) as srv:
        status, headers, doc = await get_json(srv, "/openapi.json")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    validate(doc)  # OpenAPI 3.1 (the validator picks the version from `openapi`)
    assert doc["openapi"] == "3.1.0"
    # Every $ref points at something that exists.
    for ref in set(refs(doc)):
        pointer(doc, ref)
    ops = {p: item for p, item in doc["paths"].items() if re.fullmatch(r"/agent/[^/{]+", p)}
    assert set(ops) == {f"/agent/{n}" for n in compiled.agents}
    for name in compiled.agents:
        assert list(ops[f"/agent/{name}"]) == ["post"]
        assert ops[f"/agent/{name}"]["post"]["operationId"] == name
    # Serving wrote the same document to the artifacts directory (§4.2).
    assert json.loads((out / "openapi.json").read_text()) == doc


# --------------------------------------------------------------------------
# One config in depth, with and without API_KEY


@pytest.fixture(scope="module")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InProcess]:
    async with serve(API_MOCK, env={"API_KEY": f"{KEY},other-key"}, mock=True) as s:
        yield s


@pytest.fixture(scope="module")
async def open_srv() -> AsyncIterator[InProcess]:
    async with serve(API_MOCK, mock=True) as s:
        yield s


@pytest.fixture(scope="module")
async def keyed_doc(keyed: InProcess) -> dict[str, Any]:
    status, _, doc = await get_json(keyed, "/openapi.json")  # no key needed
    assert status == 200
    validate(doc)
    return doc


async def test_each_agent_is_one_operation(keyed_doc: dict[str, Any]) -> None:
    compiled = load_and_compile(str(API_MOCK))
    op_ids = [op["operationId"] for item in keyed_doc["paths"].values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids)), "operationIds are unique"
    for name, agent in compiled.agents.items():
        op = keyed_doc["paths"][f"/agent/{name}"]["post"]
        assert op["operationId"] == name
        desc = agent.assistant.description
        if desc:
            assert op["summary"] == desc
            assert desc in op["description"]
        body = op["requestBody"]
        assert body["required"] is True
        assert list(body["content"]) == ["application/json"]


async def test_request_body_is_the_input_schema(keyed_doc: dict[str, Any]) -> None:
    compiled = load_and_compile(str(API_MOCK))
    types = compiled.config.types
    for name, agent in compiled.agents.items():
        schema = keyed_doc["paths"][f"/agent/{name}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        a = agent.assistant
        if a.input_type_name:
            assert schema == {"$ref": f"#/components/schemas/{a.input_type_name}"}
            component = keyed_doc["components"]["schemas"][a.input_type_name]
            own = {k: v for k, v in agent.input_schema.items() if k not in ("$schema", "title", "$defs")}
            assert component == json.loads(json.dumps(own).replace('"#/$defs/', '"#/components/schemas/'))
        else:
            assert schema == {"type": "object"}
        # Same verdicts as the server's own validator on a valid and on invalid bodies.
        v = validator_for(keyed_doc, schema)
        good = sample(a.input_type, types) if a.input_type is not None else {"anything": [1, 2]}
        assert v.is_valid(good) and not agent.input_validator.errors(good)
        for bad in ({}, {"name": ""}, {"name": 5}, {"unknown_field": 1}, []):
            if a.input_type is None and isinstance(bad, dict):
                continue
            assert v.is_valid(bad) == (not agent.input_validator.errors(bad) if isinstance(bad, dict) else False), (name, bad)


async def test_200_is_the_envelope_typed_by_the_output_schema(keyed: InProcess, keyed_doc: dict[str, Any]) -> None:
    compiled = load_and_compile(str(API_MOCK))
    for name, agent in compiled.agents.items():
        op = keyed_doc["paths"][f"/agent/{name}"]["post"]
        schema = response_schema(keyed_doc, op, 200)
        assert schema["required"] == ["data", "trace"]
        assert schema["properties"]["trace"] == {"$ref": "#/components/schemas/aiwfd-Trace"}
        data = schema["properties"]["data"]
        a = agent.assistant
        if a.output_type is None:
            assert data["type"] == "string"
        elif a.output_type_name and re.fullmatch(r"\w+", a.output_type_name):
            assert data == {"$ref": f"#/components/schemas/{a.output_type_name}"}
        # A real answer conforms, and a wrong `data` does not.
        body = sample(a.input_type, compiled.config.types) if a.input_type is not None else {"x": 1}
        async with keyed.session.post(keyed.url(f"/agent/{name}"), json=body, headers={"X-API-Key": KEY}) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        v = validator_for(keyed_doc, schema)
        v.validate(answer)
        assert not v.is_valid({"data": {"no": "such"} if a.output_type is None else 12345, "trace": answer["trace"]})
        assert not v.is_valid({"data": answer["data"]})


def example_applier() -> Any:
    """examples/python/patch.py's `apply`: the one the docs tell clients to copy."""
    spec = importlib.util.spec_from_file_location("example_patch", REPO / "examples" / "python" / "patch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.apply


async def read_events(srv: InProcess, path: str, body: Any) -> list[tuple[str, Any]]:
    async with srv.session.post(srv.url(path), json=body, headers={"X-API-Key": KEY}) as r:
        assert r.status == 200, await r.text()
        text = (await r.read()).decode()
    out = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln and not ln.startswith(":")]
        if lines:
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
            out.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return out


def test_the_stream_event_names_are_the_ones_the_stream_sends() -> None:
    source = (REPO / "aiwfd" / "http" / "stream.py").read_text(encoding="utf-8")
    sent = set(re.findall(r"""(?:event|send)\(\s*["']([a-z]+)["']""", source))
    assert sent == set(STREAM_EVENT_NAMES), sent


async def test_every_stream_event_matches_its_documented_schema(keyed: InProcess,
                                                                keyed_doc: dict[str, Any]) -> None:
    """Each agent streamed for real: every event is one of the enum, its `data`
    is what the event's `contentSchema` says, and the `patch` ops (the
    aiwfd-Patch component) rebuild `result.data`."""
    apply = example_applier()
    compiled = load_and_compile(str(API_MOCK))
    seen: set[str] = set()
    for name, agent in compiled.agents.items():
        op = keyed_doc["paths"][f"/agent/{name}/stream"]["post"]
        assert "`patch`" in op["description"] and "partial" not in op["description"]
        schema = op["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert schema["properties"]["event"]["enum"] == ["start", "delta", "patch", "retry", "result", "error"]
        by_event = {v["properties"]["event"]["const"]: v["properties"]["data"]["contentSchema"]
                    for v in schema["oneOf"]}
        assert list(by_event) == schema["properties"]["event"]["enum"]
        assert by_event["patch"] == {"$ref": "#/components/schemas/aiwfd-Patch"}
        body = sample(agent.assistant.input_type, compiled.config.types) if agent.assistant.input_type else {"x": 1}
        events = await read_events(keyed, f"/agent/{name}/stream", body)
        doc: Any = None
        for event, data in events:
            seen.add(event)
            validator_for(keyed_doc, by_event[event]).validate(data)
            if event == "patch":
                doc = apply(doc, data)
        assert events[-1][0] == "result", events[-1]
        patches = [d for e, d in events if e == "patch"]
        # Patches are for object outputs only (not plain text, not a wrapped enum or list).
        if agent.output_validator is not None and not agent.wrapped:
            assert patches and doc == events[-1][1]["data"], (name, patches)
        else:
            assert not patches, name
    assert {"start", "delta", "patch", "result"} <= seen

    patch = validator_for(keyed_doc, {"$ref": "#/components/schemas/aiwfd-Patch"})
    assert patch.is_valid([{"op": "add", "path": "", "value": {}},
                           {"op": "append", "path": "/items/0/a~1b~0c", "value": "x"},
                           {"op": "replace", "path": "/n", "value": None}])
    for bad in ([], [{"op": "remove", "path": "/a"}], [{"op": "add", "path": "a", "value": 1}],
                [{"op": "add", "path": "/a~2", "value": 1}], [{"op": "add", "value": 1}],
                {"op": "add", "path": "", "value": {}}):
        assert not patch.is_valid(bad), bad


async def test_every_error_status_is_documented_with_the_error_schema(keyed: InProcess,
                                                                       keyed_doc: dict[str, Any]) -> None:
    error = keyed_doc["components"]["schemas"]["aiwfd-Error"]
    assert error["required"] == ["error", "request_id"]
    assert set(error["properties"]["error"]["properties"]["type"]["enum"]) == ALL_TYPES
    for path, item in keyed_doc["paths"].items():
        if not re.fullmatch(r"/agent/[^/{]+", path):
            continue
        op = item["post"]
        documented = {int(s) for s in op["responses"] if s != "200"}
        assert documented == set(AGENT_ERRORS), path
        for status, types in AGENT_ERRORS.items():
            resp = pointer(keyed_doc, op["responses"][str(status)]["$ref"])
            assert resp["headers"]["X-Request-ID"]
            schema = resp["content"]["application/json"]["schema"]
            assert {"$ref": "#/components/schemas/aiwfd-Error"} in schema["allOf"]
            v = validator_for(keyed_doc, schema)
            for t in ALL_TYPES:  # the per-status schema admits exactly that status's types
                doc = {"error": {"type": t, "message": "m", "details": []}, "request_id": "r"}
                assert v.is_valid(doc) == (t in types), (status, t)
    # Real error answers conform to what is documented for them.
    op = keyed_doc["paths"]["/agent/greeter"]["post"]
    cases = [
        ({}, {"name": "Ann"}, 401),
        ({"X-API-Key": KEY}, {"name": ""}, 422),
        ({"X-API-Key": KEY, "Content-Type": "text/plain"}, "hi", 415),
        ({"X-API-Key": KEY, "Content-Type": "application/json"}, "[1,", 400),
    ]
    for headers, body, status in cases:
        kw = {"json": body} if isinstance(body, dict) else {"data": body}
        async with keyed.session.post(keyed.url("/agent/greeter"), headers=headers, **kw) as r:
            assert r.status == status
            validator_for(keyed_doc, response_schema(keyed_doc, op, status)).validate(await r.json())


async def test_security_schemes(keyed_doc: dict[str, Any], open_srv: InProcess) -> None:
    schemes = keyed_doc["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert "security" not in keyed_doc  # nothing global: the service routes need no key
    for path, item in keyed_doc["paths"].items():
        for op in item.values():
            if op["tags"] != ["service"]:  # agents, jobs, MCP, OpenAI: the key
                assert path.startswith(("/agent/", "/jobs", "/mcp", "/v1/")) and not path.endswith("/schema")
                assert op["security"] == [{"apiKey": []}, {"bearer": []}], path
                assert "401" in op["responses"], path
            else:
                assert op["security"] == []
    # Without API_KEY the key is optional (`{}`), and 401 cannot happen.
    status, _, doc = await get_json(open_srv, "/openapi.json")
    validate(doc)
    assert doc["components"]["securitySchemes"] == keyed_doc["components"]["securitySchemes"]
    for path, method in (("/agent/greeter", "post"), ("/agent/greeter/jobs", "post"), ("/jobs", "get"),
                         ("/jobs/{id}", "get"), ("/jobs/{id}", "delete"), ("/mcp", "post"),
                         ("/v1/models", "get"), ("/v1/chat/completions", "post")):
        op = doc["paths"][path][method]
        assert {} in op["security"] and {"apiKey": []} in op["security"], path
        assert "401" not in op["responses"], path


async def test_service_routes_are_documented(keyed: InProcess, keyed_doc: dict[str, Any]) -> None:
    paths = keyed_doc["paths"]
    for p in ("/health", "/health/ready", "/agents", "/agent/{name}/schema", "/openapi.json", "/metrics", "/docs"):
        assert list(paths[p]) == ["get"], p
    assert "/.well-known/oauth-protected-resource" not in paths  # no auth.jwt: that route is a 404
    schema_op = paths["/agent/{name}/schema"]["get"]
    assert schema_op["parameters"][0]["schema"]["enum"] == sorted(load_and_compile(str(API_MOCK)).agents)
    assert "404" in schema_op["responses"]
    for path, op_path in (("/health", "/health"), ("/health/ready", "/health/ready"), ("/agents", "/agents"),
                          ("/agent/greeter/schema", "/agent/{name}/schema")):
        status, _, body = await get_json(keyed, path)
        assert status == 200
        validator_for(keyed_doc, response_schema(keyed_doc, paths[op_path]["get"], 200)).validate(body)


# --------------------------------------------------------------------------
# Clients and limits (SPEC §8): 403 where auth can refuse, 429 and the
# RateLimit headers where limits apply, checked against real answers


@pytest.fixture
async def access(tmp_path: Path) -> AsyncIterator[InProcess]:
    async with serve(materialise(CONFIGS / "access.yaml", tmp_path), env=CONFIG_ENV, mock=True) as s:
        yield s


async def test_403_and_429_are_documented_where_auth_and_limits_apply(access: InProcess) -> None:
    """access.yaml: `reports` may call greeter only, so 403 is documented for the
    others and not for greeter; `limits.default` applies to every agent, so
    every operation documents 429 and its 200 the RateLimit headers."""
    status, _, doc = await get_json(access, "/openapi.json")
    assert status == 200
    validate(doc)
    for name in ("greeter", "other", "capped"):
        for suffix in ("", "/stream", "/batch", "/jobs"):
            op = doc["paths"][f"/agent/{name}{suffix}"]["post"]
            assert op["security"] == [{"apiKey": []}, {"bearer": []}]
            assert "401" in op["responses"] and "429" in op["responses"], (name, suffix)
            assert ("403" in op["responses"]) == (name != "greeter"), (name, suffix)
            ok = op["responses"]["202" if suffix == "/jobs" else "200"]
            assert {"RateLimit-Policy", "RateLimit"} <= set(ok["headers"]), (name, suffix)
    # Some agent can be refused: a chat completion can be 403 too.
    assert "403" in doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    forbidden = pointer(doc, doc["paths"]["/agent/other"]["post"]["responses"]["403"]["$ref"])
    assert "WWW-Authenticate" in forbidden["headers"]
    limited = pointer(doc, doc["paths"]["/agent/capped"]["post"]["responses"]["429"]["$ref"])
    assert {"Retry-After", "RateLimit-Policy", "RateLimit"} <= set(limited["headers"])

    # Real answers conform: a 403 (reports calling `other`) and a 429 (`capped` is 3/min).
    op = doc["paths"]["/agent/other"]["post"]
    async with access.session.post(access.url("/agent/other"), json={"name": "Ann"},
                                   headers={"X-API-Key": REPORTS_KEY}) as r:
        assert r.status == 403
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        validator_for(doc, response_schema(doc, op, 403)).validate(await r.json())
    op = doc["paths"]["/agent/capped"]["post"]
    answers = []
    for _ in range(4):
        async with access.session.post(access.url("/agent/capped"), json={"name": "Ann"},
                                       headers={"X-API-Key": FRONTEND_KEY}) as r:
            answers.append((r.status, dict(r.headers), await r.json()))
    statuses = [a[0] for a in answers]
    assert statuses == [200, 200, 200, 429], statuses
    for status, headers, body in answers:
        assert {"RateLimit-Policy", "RateLimit"} <= set(headers), status
        validator_for(doc, response_schema(doc, op, status)).validate(body)
    assert answers[-1][2]["error"]["details"][0]["limit"] == "requests"


async def test_jwt_documents_the_protected_resource_and_403_everywhere(tmp_path: Path) -> None:
    from aiwfd.spec.openapi import build_openapi

    # An issuer that refuses connections: the keys never load, so /health/ready is 503.
    cfg = write_config(tmp_path, """\
auth:
  jwt:
    issuer: http://127.0.0.1:9/realms/main
    audience: aiwfd
    scope_prefix: "aiwfd:"
assistants:
  first:
    use: mock
    model: m
""")
    compiled = load_and_compile(str(cfg))
    doc = build_openapi(compiled)  # as `aiwfd compile` writes it
    validate(doc)
    op = doc["paths"]["/agent/first"]["post"]
    # `auth:` in the file: credentials are required even where API_KEY is unknown.
    assert op["security"] == [{"apiKey": []}, {"bearer": []}]
    assert {"401", "403"} <= set(op["responses"])
    assert "429" not in doc["paths"]["/agent/first/stream"]["post"]["responses"]  # no limits
    assert "RateLimit" not in op["responses"]["200"]["headers"]
    assert "http://127.0.0.1:9/realms/main" in doc["info"]["description"]
    paths = doc["paths"]
    assert list(paths["/.well-known/oauth-protected-resource"]) == ["get"]
    async with serve(cfg) as srv:
        _, _, served = await get_json(srv, "/openapi.json")
        assert served == doc
        for path, status in (("/.well-known/oauth-protected-resource", 200), ("/health/ready", 503)):
            got, _, body = await get_json(srv, path)
            assert got == status, (path, body)
            validator_for(doc, response_schema(doc, paths[path]["get"], status)).validate(body)
        async with srv.session.post(srv.url("/agent/first"), json={}) as r:
            assert r.status == 401
            assert "resource_metadata=" in r.headers["WWW-Authenticate"]
            validator_for(doc, response_schema(doc, op, 401)).validate(await r.json())


async def test_document_is_cached_per_load(keyed: InProcess) -> None:
    snap = keyed.server.runtime.snapshot  # type: ignore[union-attr]
    async with keyed.session.get(keyed.url("/openapi.json")) as r:
        assert await r.read() == snap.openapi_json


# --------------------------------------------------------------------------
# GET /agent/{name}/schema


async def test_agent_schema(keyed: InProcess) -> None:
    compiled = load_and_compile(str(API_MOCK))
    for name, agent in compiled.agents.items():
        status, headers, doc = await get_json(keyed, f"/agent/{name}/schema")  # no key: like /agents
        assert status == 200, doc
        assert headers["Content-Type"].startswith("application/json")
        assert set(doc) == {"input", "output"}
        assert doc["input"] == agent.input_schema
        if agent.output_schema is None:
            assert doc["output"]["type"] == "string"
        else:
            assert doc["output"] == agent.output_schema
        for s in doc.values():
            jsonschema.Draft202012Validator.check_schema(s)


async def test_agent_schema_of_unknown_agent_is_404(keyed: InProcess) -> None:
    status, headers, doc = await get_json(keyed, "/agent/greeterr/schema")
    assert status == 404
    assert doc["error"]["type"] == "not_found"
    assert "did you mean 'greeter'" in doc["error"]["message"]
    assert doc["request_id"] == headers["X-Request-ID"]
    async with keyed.session.post(keyed.url("/agent/greeter/schema"), json={}) as r:
        assert r.status == 405
        assert (await r.json())["error"]["type"] == "method_not_allowed"


# --------------------------------------------------------------------------
# Rebuilt on reload; written by `aiwfd compile`

RELOAD_BASE = """\
version: 0.3
types:
  Req:
    name: string(1..10)
assistants:
  first:
    use: mock
    model: m
    input_type: Req
"""
RELOAD_MORE = RELOAD_BASE + """\
  second:
    use: mock
    model: m
    description: Added by a reload.
    input_type: Req
    output_type: Req
"""


async def test_document_is_rebuilt_on_reload(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, RELOAD_BASE)
    out = tmp_path / "out"
    async with serve(cfg, output_dir=str(out)) as srv:
        _, _, before = await get_json(srv, "/openapi.json")
        assert "/agent/second" not in before["paths"]
        write_config(tmp_path, RELOAD_MORE)
        assert await srv.server.reload()
        _, _, after = await get_json(srv, "/openapi.json")
        validate(after)
        assert after["paths"]["/agent/second"]["post"]["summary"] == "Added by a reload."
        assert after["paths"]["/agent/{name}/schema"]["get"]["parameters"][0]["schema"]["enum"] == ["first", "second"]
        assert json.loads((out / "openapi.json").read_text()) == after
        status, _, schema = await get_json(srv, "/agent/second/schema")
        assert status == 200 and schema["output"]["title"] == "Req"
        # An invalid config keeps the previous document.
        write_config(tmp_path, "assistants: [")
        assert not await srv.server.reload()
        _, _, kept = await get_json(srv, "/openapi.json")
        assert kept == after


def test_document_is_rebuilt_on_sighup(tmp_path: Path) -> None:
    """The real daemon: SIGHUP → the new agent is in /openapi.json."""
    import urllib.request

    cfg = write_config(tmp_path, RELOAD_BASE)
    with AiwfdProcess(["serve", "-f", str(cfg), "-p", "0"]) as proc:
        def doc() -> dict[str, Any]:
            with urllib.request.urlopen(proc.url("/openapi.json"), timeout=10) as r:
                return json.loads(r.read())
        assert "/agent/second" not in doc()["paths"]
        write_config(tmp_path, RELOAD_MORE)
        proc.send(signal.SIGHUP)
        proc.wait_for_log(r"reloaded .*: 2 agents")
        assert "/agent/second" in doc()["paths"]


def test_compile_writes_openapi_json(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(["compile", "-f", str(API_MOCK), "-o", str(out)])
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "openapi.json").read_text())
    validate(doc)
    compiled = load_and_compile(str(API_MOCK))
    assert {f"/agent/{n}" for n in compiled.agents} <= set(doc["paths"])
    # compile cannot know API_KEY: the key is shown as optional and 401 is documented.
    op = doc["paths"]["/agent/greeter"]["post"]
    assert {} in op["security"] and {"apiKey": []} in op["security"]
    assert "401" in op["responses"]
    assert (out / "agents" / "greeter.json").is_file()


def test_agents_named_like_service_operations_keep_ids_unique(tmp_path: Path) -> None:
    from aiwfd.spec.openapi import build_openapi

    names = ["health", "metrics", "docs", "openapi", "listAgents", "agentSchema", "service", "jobs", "mcp",
             "openai", "list", "get", "cancel"]
    cfg = write_config(tmp_path, "assistants:\n" + "".join(
        f"  {n}:\n    use: mock\n    model: m\n" for n in names))
    doc = build_openapi(load_and_compile(str(cfg)))
    validate(doc)
    op_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids)), sorted(op_ids)
    for n in names:
        assert doc["paths"][f"/agent/{n}"]["post"]["operationId"] == n


# --------------------------------------------------------------------------
# Every route of the app has its operations


def documented(doc: dict[str, Any], method: str, path: str, agents: list[str]) -> list[str]:
    """The operations of `doc` for route `method path`; `/agent/{name}…` is one path per agent."""
    if path.startswith("/agent/{name}") and path != "/agent/{name}/schema":
        paths = [path.replace("{name}", n) for n in agents]
    else:
        paths = [path]
    return [f"{method} {p}" for p in paths if method.lower() in doc["paths"].get(p, {})]


async def test_every_route_has_an_operation(keyed_doc: dict[str, Any]) -> None:
    from aiwfd.http import access
    from aiwfd.http.app import ROUTES  # the one route table the app is built from

    agents = sorted(load_and_compile(str(API_MOCK)).agents)
    ops = {f"{m.upper()} {p}" for p, item in keyed_doc["paths"].items() for m in item}
    covered: set[str] = set()
    for r in ROUTES:
        if r.path == access.RESOURCE_METADATA_PATH:  # only with auth.jwt: the jwt test's
            continue
        found = documented(keyed_doc, r.method, r.path, agents)
        per_agent = r.path.startswith("/agent/{name}") and r.path != "/agent/{name}/schema"
        assert len(found) == (len(agents) if per_agent else 1), f"{r.method} {r.path} has no operation"
        covered.update(found)
    # And nothing is documented that the app does not route (/docs is aiwfd.http.docs', not ROUTES').
    assert ops - covered == {"GET /docs"}, ops - covered
    assert {"POST /agent/greeter/jobs", "GET /jobs", "GET /jobs/{id}", "DELETE /jobs/{id}", "POST /mcp",
            "GET /v1/models", "POST /v1/chat/completions"} <= ops
    # No agent of api_mock.yaml can be refused: no 403 but /mcp's (a browser's Origin it does not allow).
    forbidding = [p for p, item in keyed_doc["paths"].items() for op in item.values() if "403" in op["responses"]]
    assert forbidding == ["/mcp"], forbidding


def test_the_documented_job_statuses_and_cursors_are_the_stores() -> None:
    assert JOB_STATUSES == get_args(JobStatus)
    rx = re.compile(CURSOR_PATTERN)
    for seq in (0, 1, 9, 10, 99, 123, 4567, 10**6, 2**31, 2**53, 10**18 - 1):
        assert rx.fullmatch(encode_cursor(seq)), seq
        assert decode_cursor(encode_cursor(seq)) == seq
    # Every string the pattern admits is a cursor the stores decode (so a
    # generated one is never a 400), and none too long for SQLite's integers.
    from hypothesis import given, settings, strategies

    @settings(max_examples=150, deadline=None)
    @given(strategies.from_regex(CURSOR_PATTERN, fullmatch=True))
    def decodes(cursor: str) -> None:
        assert 0 <= decode_cursor(cursor) < 2**63

    decodes()
    for bad in ("", "ajE6", "j1:5", encode_cursor(10**18), "ajE6MQ=="):
        assert not rx.fullmatch(bad), bad


# --------------------------------------------------------------------------
# Jobs (SPEC §9.1): the documented shapes against a real server's answers

JOB_SECRET = "whsec_" + base64.b64encode(b"test-secret-of-sixteen+").decode()
JOBS_CONFIG = """\
version: 0.3
providers:
  fake:
    base_url: @FAKE_URL@
    api_key_env: FAKE_KEY
types:
  In:
    name: string
  Out:
    message: string
assistants:
  greeter:
    use: fake
    model: gpt-4o-mini
    input_type: In
    output_type: Out
    max_attempts: 1
jobs:
  concurrency: 1
  webhook:
    url: @HOOK_URL@
    allow_private: true
  allow_request_webhooks: ["@HOOK_BASE@/own/", "https://hooks.example.com/a+b?"]
"""


@pytest.fixture
async def jobs_srv(tmp_path: Path) -> AsyncIterator[tuple[InProcess, FakeOpenAI]]:
    async with FakeOpenAI() as fake, WebhookReceiver([JOB_SECRET]) as rx:
        cfg = write_config(tmp_path, JOBS_CONFIG.replace("@FAKE_URL@", fake.base_url)
                           .replace("@HOOK_URL@", rx.url).replace("@HOOK_BASE@", rx.base_url))
        env = fake_env(fake, FAKE_KEY="sk-fake", API_KEY=KEY, AIWF_WEBHOOK_SECRET=JOB_SECRET)
        async with serve(cfg, env=env) as srv:
            srv.hook_base = rx.base_url  # type: ignore[attr-defined]
            yield srv, fake


async def call(srv: InProcess, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    headers = {"X-API-Key": KEY, **kw.pop("headers", {})}
    async with srv.session.request(method, srv.url(path), headers=headers, **kw) as r:
        return r.status, dict(r.headers), await r.json()


def operation_schema(doc: dict[str, Any], path: str, method: str, status: int) -> jsonschema.Draft202012Validator:
    return validator_for(doc, response_schema(doc, doc["paths"][path][method], status))


async def until_status(srv: InProcess, job_id: str, *statuses: str, webhook: str | None = None) -> dict[str, Any]:
    end = time.monotonic() + 10
    while True:
        status, _, doc = await call(srv, "GET", f"/jobs/{job_id}")
        assert status == 200, doc
        if doc["status"] in statuses and (webhook is None or (doc["webhook"] or {}).get("status") == webhook):
            return dict(doc)
        assert time.monotonic() < end, doc
        await asyncio.sleep(0.02)


async def test_the_job_documents_match_the_schema(jobs_srv: tuple[InProcess, FakeOpenAI]) -> None:
    srv, fake = jobs_srv
    status, _, doc = await get_json(srv, "/openapi.json")
    assert status == 200
    validate(doc)
    job = validator_for(doc, {"$ref": "#/components/schemas/aiwfd-Job"})
    submit_op = doc["paths"]["/agent/greeter/jobs"]["post"]
    assert submit_op["operationId"] == "greeter.jobs"
    assert submit_op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/In"}
    assert {"Location", "Idempotency-Replayed", "X-Request-ID"} <= set(submit_op["responses"]["202"]["headers"])
    op_ids = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    links = submit_op["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} == {"jobs.get", "jobs.cancel"} <= op_ids

    # The Webhook-URL header: documented with the prefixes, and a URL it admits is accepted.
    (hook,) = [p for p in submit_op["parameters"] if p.get("name") == "Webhook-URL"]
    hook_rx = re.compile(hook["schema"]["pattern"])
    own = srv.hook_base + "/own/job?token=t"  # type: ignore[attr-defined]
    assert hook_rx.match(own) and hook_rx.match("https://hooks.example.com/a+b?x")
    assert not hook_rx.match(srv.hook_base + "/elsewhere") and not hook_rx.match("https://hooks.example.com/aab")  # type: ignore[attr-defined]

    # Submitted (202), then succeeded with a delivered webhook: both documents conform.
    fake.script(Reply(data={"message": "Hello, Ann"}))
    status, headers, queued = await call(srv, "POST", "/agent/greeter/jobs", json={"name": "Ann"},
                                         headers={"Idempotency-Key": "job-1", "Webhook-URL": own})
    assert status == 202, queued
    assert headers["Location"] == f"/jobs/{queued['id']}"
    operation_schema(doc, "/agent/greeter/jobs", "post", 202).validate(queued)
    job.validate(queued)
    assert queued["webhook"] == {"status": "pending", "attempts": 0, "last_status": None}
    done = await until_status(srv, queued["id"], "succeeded", webhook="delivered")
    operation_schema(doc, "/jobs/{id}", "get", 200).validate(done)
    job.validate(done)
    assert done["result"]["data"] == {"message": "Hello, Ann"} and done["webhook"]["last_status"] == 200
    # The per-agent schema types `result.data`: another shape does not pass.
    per_agent = operation_schema(doc, "/agent/greeter/jobs", "post", 202)
    per_agent.validate(done)
    assert not per_agent.is_valid({**done, "result": {**done["result"], "data": {"no": "message"}}})
    assert not per_agent.is_valid({**done, "agent": "someone-else"})
    for bad in ({**done, "status": "done"}, {**done, "created_at": None}, {k: v for k, v in done.items() if k != "error"}):
        assert not job.is_valid(bad)

    # A failed job (its error is the §3.1 error object), and a canceled one.
    fake.script(Reply(content="not json"))
    status, _, failing = await call(srv, "POST", "/agent/greeter/jobs", json={"name": "Bo"})
    assert status == 202
    failed = await until_status(srv, failing["id"], "failed")
    assert failed["error"]["type"] == "invalid_output"
    operation_schema(doc, "/jobs/{id}", "get", 200).validate(failed)
    gate = asyncio.Event()
    fake.script(Hold(gate))
    calls = fake.calls
    status, _, held = await call(srv, "POST", "/agent/greeter/jobs", json={"name": "Cy"})
    assert status == 202
    await fake.wait_calls(calls + 1)
    running = await until_status(srv, held["id"], "running")
    job.validate(running)
    status, _, canceled = await call(srv, "DELETE", f"/jobs/{held['id']}")
    gate.set()
    assert status == 200 and canceled["status"] == "canceled", canceled
    operation_schema(doc, "/jobs/{id}", "delete", 200).validate(canceled)
    assert not operation_schema(doc, "/jobs/{id}", "delete", 200).is_valid(done)  # 200 is `canceled` only

    # The list, paged: its body and its cursor.
    status, _, page = await call(srv, "GET", "/jobs", params={"limit": "2"})
    assert status == 200
    operation_schema(doc, "/jobs", "get", 200).validate(page)
    assert [j["id"] for j in page["jobs"]] == [held["id"], failing["id"]] and page["next_cursor"]
    status, _, last = await call(srv, "GET", "/jobs", params={"limit": "2", "cursor": page["next_cursor"]})
    assert status == 200 and [j["id"] for j in last["jobs"]] == [queued["id"]] and last["next_cursor"] is None
    operation_schema(doc, "/jobs", "get", 200).validate(last)

    # The documented errors, as answered.
    cases = [
        ("DELETE", f"/jobs/{queued['id']}", {}, 409),
        ("DELETE", "/jobs/no-such-job", {}, 404),
        ("GET", "/jobs/no-such-job", {}, 404),
        ("GET", "/jobs", {"params": {"limit": "0"}}, 400),
        ("GET", "/jobs", {"params": {"cursor": "nope"}}, 400),
        ("GET", "/jobs", {"headers": {"X-API-Key": "wrong"}}, 401),
        ("POST", "/agent/greeter/jobs", {"json": {"name": 5}}, 422),
        ("POST", "/agent/greeter/jobs", {"json": {"name": "Di"}, "headers": {"Webhook-URL": "https://else.example/"}}, 422),
        ("POST", "/agent/nobody/jobs", {"json": {"name": "Di"}}, 404),
    ]
    for method, path, kw, expected in cases:
        status, headers, body = await call(srv, method, path, **kw)
        assert status == expected, (method, path, body)
        op_path = "/jobs/{id}" if path.startswith("/jobs/") else "/agent/greeter/jobs" if "/agent/" in path else path
        operation_schema(doc, op_path, method.lower(), status).validate(body)
    finished = pointer(doc, doc["paths"]["/jobs/{id}"]["delete"]["responses"]["409"]["$ref"])
    assert "Retry-After" not in finished["headers"] and "only a queued or running job" in finished["description"]


# --------------------------------------------------------------------------
# MCP and the OpenAI-compatible API (SPEC §10): real answers against the document


def content_schema(doc: dict[str, Any], op: dict[str, Any], status: int, media: str) -> dict[str, Any]:
    resp = op["responses"][str(status)]
    if "$ref" in resp:
        resp = pointer(doc, resp["$ref"])
    return resp["content"][media]["schema"]


async def test_mcp_answers_match_the_schema(keyed: InProcess, keyed_doc: dict[str, Any]) -> None:
    op = keyed_doc["paths"]["/mcp"]["post"]
    assert op["operationId"] == "mcp.request" and "get" not in keyed_doc["paths"]["/mcp"]
    request = validator_for(keyed_doc, op["requestBody"]["content"]["application/json"]["schema"])
    auth = {"X-API-Key": KEY}

    async def rpc(body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if isinstance(body, str) else json.dumps(body)
        async with keyed.session.post(keyed.url("/mcp"), data=data,
                                      headers={"Content-Type": "application/json", **(auth if headers is None else headers)}) as r:
            return r.status, (await r.json() if r.status != 202 else await r.read())

    calls = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize",
         "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
        {"jsonrpc": "2.0", "id": "two", "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "greeter", "arguments": {"name": "Ann"}}},
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "greeter", "arguments": {"name": ""}}},
        {"jsonrpc": "2.0", "id": 5, "method": "no/such/method"},
    ]
    ok = validator_for(keyed_doc, content_schema(keyed_doc, op, 200, "application/json"))
    for body in calls:
        request.validate(body)
        status, answer = await rpc(body)
        assert status == 200, answer
        ok.validate(answer)
        assert answer["id"] == body["id"]
    status, answer = await rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert status == 202 and answer == b"" and "202" in op["responses"]
    bad = validator_for(keyed_doc, content_schema(keyed_doc, op, 400, "application/json"))
    for body in ("{not json", [{"jsonrpc": "2.0", "id": 1, "method": "ping"}], {"jsonrpc": "1.0", "id": 1, "method": "ping"}):
        status, answer = await rpc(body)
        assert status == 400, answer
        bad.validate(answer)
        assert not request.is_valid(body)
    status, answer = await rpc({"jsonrpc": "2.0", "id": 6, "method": "ping"},
                               {**auth, "MCP-Protocol-Version": "1999-01-01"})
    assert status == 400
    bad.validate(answer)
    status, answer = await rpc(calls[1], {})
    assert status == 401
    validator_for(keyed_doc, response_schema(keyed_doc, op, 401)).validate(answer)


async def test_openai_answers_match_the_schema(keyed: InProcess, keyed_doc: dict[str, Any]) -> None:
    models_op = keyed_doc["paths"]["/v1/models"]["get"]
    chat_op = keyed_doc["paths"]["/v1/chat/completions"]["post"]
    names = sorted(load_and_compile(str(API_MOCK)).agents)
    auth = {"Authorization": f"Bearer {KEY}"}

    status, _, models = await get_json(keyed, "/v1/models", headers=auth)
    assert status == 200
    validator_for(keyed_doc, response_schema(keyed_doc, models_op, 200)).validate(models)
    assert [m["id"] for m in models["data"]] == names
    status, _, body = await get_json(keyed, "/v1/models")
    assert status == 401
    validator_for(keyed_doc, response_schema(keyed_doc, models_op, 401)).validate(body)

    request = validator_for(keyed_doc, chat_op["requestBody"]["content"]["application/json"]["schema"])
    cases = [
        ({"model": "greeter", "messages": [{"role": "user", "content": json.dumps({"name": "Ann"})}]}, auth, 200),
        ({"model": "greeter", "messages": [{"role": "user", "content": "Ann"}]}, auth, 200),  # plain text
        ({"model": "check-order", "messages": [{"role": "user", "content": "{}"}]}, auth, 422),
        ({"model": "check-order", "messages": [{"role": "user", "content": "not json"}]}, auth, 400),
        ({"model": "nobody", "messages": [{"role": "user", "content": "x"}]}, auth, 404),
        ({"model": "greeter", "messages": [{"role": "user", "content": "Ann"}]}, {}, 401),
    ]
    for body, headers, expected in cases:
        assert request.is_valid(body) == (body["model"] != "nobody"), body
        async with keyed.session.post(keyed.url("/v1/chat/completions"), json=body, headers=headers) as r:
            assert r.status == expected, await r.text()
            answer = await r.json()
        validator_for(keyed_doc, response_schema(keyed_doc, chat_op, expected)).validate(answer)
        if expected != 200:
            assert answer["error"]["code"] == {400: "invalid_json", 401: "unauthorized", 404: "not_found",
                                               422: "invalid_input"}[expected]
            # The §3.1 shape is not what /v1 answers.
            assert not validator_for(keyed_doc, {"$ref": "#/components/schemas/aiwfd-Error"}).is_valid(answer)

    # Streamed: every event is a chunk, then [DONE].
    body = {"model": "greeter", "messages": [{"role": "user", "content": "Ann"}], "stream": True,
            "stream_options": {"include_usage": True}}
    async with keyed.session.post(keyed.url("/v1/chat/completions"), json=body, headers=auth) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        text = (await r.read()).decode()
    event = content_schema(keyed_doc, chat_op, 200, "text/event-stream")
    chunk = validator_for(keyed_doc, event["properties"]["data"]["anyOf"][1]["contentSchema"])
    datas = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]
    assert datas[-1] == "[DONE]" and len(datas) >= 4
    for d in datas[:-1]:
        chunk.validate(json.loads(d))
    assert json.loads(datas[-2])["usage"]["total_tokens"] > 0
