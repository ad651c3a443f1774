"""The request body of an agent call: size limit, body timeout, Content-Encoding, JSON.

aiohttp's own decompression is switched off (`auto_decompress=False`, see
aiwfd/http/protocol.py): it reads `Content-Length` bytes out of the *decompressed*
stream, so a gzip body was cut at its compressed size, and it checks no limit
on what it inflates, so a 49 KB gzip bomb became 50 MiB of memory. Here the
raw body is read (at most the limit), then inflated in 64 KiB steps, so
neither the compressed nor the decompressed size can pass the limit, and a
body that would pass it is refused before more than one step is held.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any, Iterator

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from aiwfd.errors import InvalidJSON, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from aiwfd.compat import timeout as _timeout
from aiwfd.spec.jsonparse import parse_object


# Content-Encoding values accepted (RFC 9110 §8.4.1; x-gzip is gzip's old name).
IDENTITY, GZIP, DEFLATE = "identity", "gzip", "deflate"
_ENCODINGS = {"": IDENTITY, "identity": IDENTITY, "gzip": GZIP, "x-gzip": GZIP, "deflate": DEFLATE}


def content_encoding(request: web.Request) -> str:
    """The body's coding, checked before anything is read: 415 for one we cannot undo."""
    raw = request.headers.get("Content-Encoding")
    if raw is None:
        return IDENTITY
    coding = _ENCODINGS.get(raw.strip().lower())
    if coding is None:
        raise UnsupportedMediaType(
            "Content-Encoding is not supported; send the body uncompressed, or as gzip or deflate",
            headers={"Accept-Encoding": "gzip, deflate"})
    return coding


def check_length(request: web.Request, limit: int) -> None:
    """A declared Content-Length over the limit is refused before a byte is read."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit}")


async def read_json(request: web.Request, limit: int, timeout: float, coding: str = IDENTITY) -> dict[str, Any]:
    """The body as a JSON object; `check_length` and `content_encoding` ran before."""
    raw = await read_raw(request, limit, timeout)
    if coding != IDENTITY:
        raw = inflate(raw, coding, limit)
    return parse_object(raw)


async def read_raw(request: web.Request, limit: int, timeout: float) -> bytes:
    length = request.content_length
    try:
        if length is not None and request.content.is_eof():
            # The whole body came with the headers (the usual case): nothing can
            # stall, so skip arming a timer.
            return await request.content.read()
        async with _timeout(timeout):
            if length is not None:
                return await request.content.readexactly(length) if length else b""
            return await _read_limited(request, limit)
    except asyncio.IncompleteReadError:
        raise RequestTimeout("the request body ended before Content-Length bytes arrived") from None
    # asyncio.TimeoutError, not the builtin: they are one class only from 3.11 on.
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g}s") from None
    except RequestPayloadError:
        # A malformed chunked encoding; the parser's message quotes the bytes.
        raise InvalidJSON("the request body's chunked transfer encoding is malformed") from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def inflate(raw: bytes, coding: str, limit: int) -> bytes:
    """`raw` decompressed; 413 once it would pass `limit`.

    Two passes: the first only counts (one chunk in memory at a time), so a
    bomb is refused having held next to nothing; only a body known to fit is
    inflated again and kept. Inflating is ~1 ms per MB: cheap next to a model call.
    """
    size = 0
    for chunk in _inflated(raw, coding):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body decompresses to more than the limit of {limit} bytes")
    return b"".join(_inflated(raw, coding))


_CHUNK = 64 * 1024


# gzip members one body may hold: a stream of 50,000 empty members took 1.4 s
# of the event loop to inflate, against 1.6 ms for a real 1 MiB body.
MAX_MEMBERS = 64


def _inflated(raw: bytes, coding: str) -> Iterator[bytes]:
    data = raw
    members = 0
    try:
        while True:
            members += 1
            if members > MAX_MEMBERS:
                raise InvalidJSON(f"the gzip request body has more than {MAX_MEMBERS} members")
            d = zlib.decompressobj(_wbits(coding, data))
            while True:
                chunk = d.decompress(data, _CHUNK)
                if chunk:
                    yield chunk
                data = d.unconsumed_tail
                # No input left and nothing came out: the stream needs more than it has.
                if d.eof or (not chunk and not data):
                    break
            if not d.eof:
                raise InvalidJSON(f"the {coding} request body is truncated")
            data = d.unused_data
            # gzip allows several members one after the other (RFC 1952 §2.2).
            if not data or coding != GZIP:
                break
    except zlib.error:
        raise InvalidJSON(f"the request body is not valid {coding} data") from None
    if data:
        raise InvalidJSON(f"the {coding} request body has data after its end")


def _wbits(coding: str, data: bytes) -> int:
    if coding == GZIP:
        return 16 + zlib.MAX_WBITS
    # HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2), but some
    # clients send a raw deflate stream: accept both, as browsers do.
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
    return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
