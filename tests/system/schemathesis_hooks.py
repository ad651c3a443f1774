"""Hooks for the schemathesis runs of test_schemathesis.py (SCHEMATHESIS_HOOKS).

schemathesis sends one generated `Idempotency-Key` with many different bodies,
and aiwfd rightly answers 422 `idempotency_key_reused` to all but the first
(SPEC §9.4). Each request gets a key of its own; that every value the document
allows is taken is tests/unit/test_idempotency_key.py's to show.

A chat completion (SPEC §10.2) carries the agent's input as a string: the last
`user` message's content, JSON of the agent's input type. No schema of the
request can say that, so a generated body is valid for the document and still
a 422 for the agent. A positive case gets one more message, the last `user`
one, with a valid input of its model (a sample of its input type, from the
config in AIWFD_ST_CONFIG); the rest of the body stays as generated.

A run that authenticates with `X-API-Key` (AIWFD_ST_CREDENTIAL=x-api-key) may
also get a generated, invalid `Authorization` header for the document's other
security scheme, and call aiwfd's 200 a schema-violating request accepted:
aiwfd reads `Authorization` only when no `X-API-Key` is sent (docs/api.md: "X-API-Key wins"; a proxy
in front may use it for itself), so that one failure is dropped there. The
bearer run checks `Authorization` itself."""

from __future__ import annotations

import json
import os
import uuid
from functools import lru_cache
from typing import Any

import schemathesis

CHAT = "/v1/chat/completions"


@lru_cache(maxsize=1)
def samples() -> dict[str, Any]:
    """A valid input per agent of the served config."""
    from aiwfd.providers.mock import sample
    from aiwfd.spec.compiler import load_and_compile

    compiled = load_and_compile(os.environ["AIWFD_ST_CONFIG"])
    types = compiled.config.types
    return {name: sample(a.assistant.input_type, types) if a.assistant.input_type is not None else {"x": 1}
            for name, a in compiled.agents.items()}


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is None or meta.generation.mode.is_positive


@schemathesis.hook
def filter_failure(ctx: Any, failure: Any, case: Any, response: Any) -> bool:
    if os.environ.get("AIWFD_ST_CREDENTIAL") != "x-api-key" or getattr(failure, "code", None) != "ST201":
        return True
    return "Authorization" not in (case.headers or {})


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = f"st-{uuid.uuid4().hex}"
    if (case.path == CHAT and case.method.upper() == "POST" and "AIWFD_ST_CONFIG" in os.environ
            and isinstance(case.body, dict) and _positive(case)):
        good = samples().get(case.body.get("model"))
        messages = case.body.get("messages")
        if good is not None and isinstance(messages, list):
            case.body["messages"] = [*messages, {"role": "user", "content": json.dumps(good)}]
