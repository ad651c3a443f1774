"""Who is calling and whether they may (SPEC §8.1): credentials to a `Client`, then the allowlist.

    X-API-Key: <key>                 a key of API_KEY or auth.keys
    Authorization: Bearer <key>      the same
    Authorization: Bearer <a.b.c>    a JWT, when auth.jwt is set

With neither `API_KEY` nor `auth`, every caller is `anonymous` (as before).
Refusals: 401 `unauthorized` with an RFC 6750 `WWW-Authenticate` (and, with
auth.jwt, the RFC 9728 `resource_metadata` that tells an MCP client where to
get a token), 403 `forbidden` for an agent outside the client's allowlist or
scopes, 503 `unavailable` while the issuer's keys have not loaded yet.
"""

from __future__ import annotations

import re

from aiohttp import web

from aiwfd.auth.clients import ANONYMOUS, Client
from aiwfd.auth.errors import KeysUnavailable, TokenError
from aiwfd.errors import Forbidden, NotFound, Unauthorized, Unavailable
from aiwfd.http.keys import RUNTIME
from aiwfd.http.middlewares import json_response
from aiwfd.http.runtime import Snapshot

# Three base64url parts: a JWT (an API key has no dots).
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"


def credentials(request: web.Request) -> tuple[str, bool] | None:
    """(the credential sent, whether it came as a bearer value); None when none was."""
    given = request.headers.get("X-API-Key")
    if given is not None:
        return (given, False) if given else None
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        value = auth[7:].strip()
        return (value, True) if value else None
    return None


def challenge(request: web.Request, snap: Snapshot, error: str | None = None,
              description: str | None = None) -> dict[str, str]:
    """The `WWW-Authenticate` header of a 401 or 403 (RFC 6750 §3, RFC 9728 §5.1)."""
    params = []
    if snap.jwt is not None:
        params.append(f'resource_metadata="{resource_url(request)}{RESOURCE_METADATA_PATH}"')
    if error:
        params.append(f'error="{error}"')
    if description:
        params.append('error_description="' + description.replace("\\", "").replace('"', "'") + '"')
    return {"WWW-Authenticate": "Bearer" + (" " + ", ".join(params) if params else "")}


def resource_url(request: web.Request) -> str:
    """This server's origin as the client reached it (behind nginx: X-Forwarded-* are not trusted,
    the Host header is: it is what the client typed)."""
    return f"{request.scheme}://{request.host}"


async def authenticate(request: web.Request, snap: Snapshot) -> Client:
    if not snap.auth_required:
        return ANONYMOUS
    sent = credentials(request)
    if sent is None:
        raise Unauthorized("missing credentials: send X-API-Key or Authorization: Bearer",
                           headers=challenge(request, snap))
    value, bearer = sent
    if bearer and snap.verifier is not None and _JWT.fullmatch(value):
        try:
            claims = await snap.verifier.verify(value)
        except TokenError as e:
            raise Unauthorized(f"invalid token: {e.description}",
                               headers=challenge(request, snap, "invalid_token", e.description)) from None
        except KeysUnavailable:
            raise Unavailable("the token issuer's keys are not loaded yet; try again shortly",
                              headers={"Retry-After": "5"}) from None
        assert snap.jwt is not None
        return Client(claims.client, "jwt", None, snap.jwt.limits, claims.scopes)
    # Headers arrive as latin-1/surrogate-escaped text: the bytes the client sent.
    client = snap.keys.find(value.encode("utf-8", "surrogateescape"))
    if client is None:
        raise Unauthorized("invalid API key", headers=challenge(request, snap, "invalid_token",
                                                                "unknown API key"))
    return client


def authorize(request: web.Request, snap: Snapshot, client: Client, agent: str) -> None:
    """403 for an agent outside the client's allowlist, or a token without its scope."""
    if not client.may_call(agent):
        raise Forbidden(f"client {client.name!r} may not call agent {agent!r}",
                        headers=challenge(request, snap, "insufficient_scope"))
    if client.scopes is not None and snap.jwt is not None and snap.jwt.scope_prefix is not None:
        prefix = snap.jwt.scope_prefix
        if prefix + agent not in client.scopes and prefix + "*" not in client.scopes:
            raise Forbidden(f"the token has no scope {prefix}{agent} (or {prefix}*)",
                            headers=challenge(request, snap, "insufficient_scope",
                                              f"needs scope {prefix}{agent}"))


async def protected_resource(request: web.Request) -> web.Response:
    """`GET /.well-known/oauth-protected-resource` (RFC 9728): who issues tokens for this API."""
    snap = request.app[RUNTIME].snapshot
    if snap.jwt is None:
        raise NotFound("this server takes no OAuth tokens (no auth.jwt in its config)")
    doc = {
        "resource": resource_url(request),
        "authorization_servers": [snap.jwt.issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ([snap.jwt.scope_prefix + "*"]
                             + [snap.jwt.scope_prefix + a for a in sorted(snap.compiled.agents)]
                             if snap.jwt.scope_prefix else []),
        "resource_name": "aiwfd",
    }
    return json_response(doc)
