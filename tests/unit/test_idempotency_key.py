"""The OpenAPI pattern of `Idempotency-Key` and the server's parser agree: every value
the document calls valid is taken (schemathesis sends such values and expects no 400)."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings, strategies as st

from aiwfd.errors import InvalidRequest
from aiwfd.http.idempotency import parse_key
from aiwfd.spec.openapi import IDEMPOTENCY_KEY_PATTERN


def parsed(value: str) -> str | None:
    return parse_key(make_mocked_request("POST", "/agent/x", headers={"Idempotency-Key": value}))


@settings(max_examples=300, deadline=None)
@given(st.from_regex(IDEMPOTENCY_KEY_PATTERN, fullmatch=True))
def test_every_documented_value_is_taken(value: str) -> None:
    key = parsed(value)
    assert key is not None and 1 <= len(key) <= 255


@pytest.mark.parametrize("value", ['""', "a b", '"abc', "é", "a" * 256, '"' + "a" * 256 + '"', 'a"b'])
def test_what_the_document_refuses_the_server_refuses(value: str) -> None:
    assert not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value)
    with pytest.raises(InvalidRequest):
        parsed(value)
