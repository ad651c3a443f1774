"""Hooks for the schemathesis runs of test_schemathesis.py (SCHEMATHESIS_HOOKS).

schemathesis sends one generated `Idempotency-Key` with many different bodies,
and aiwfd rightly answers 422 `idempotency_key_reused` to all but the first
(SPEC §9.4). Each request gets a key of its own; that every value the document
allows is taken is tests/unit/test_idempotency_key.py's to show."""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = f"st-{uuid.uuid4().hex}"
