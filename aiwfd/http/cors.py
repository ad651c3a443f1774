"""CORS from the agents file's `server.cors` (SPEC §7.3).

A `CorsPolicy` is built once per load and kept on the snapshot, so a reload
can add, change or remove it. The `core` middleware uses it in two places:

- a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
  from an allowed origin is answered 204 here, for any path, without reaching
  the router (which would answer 405);
- every other answer from an allowed origin (200 and every error, including
  those the middleware itself produces) gets `Access-Control-Allow-Origin`
  and friends.

A disallowed origin gets no CORS header at all (its preflight is an ordinary
OPTIONS request: 405), so the browser refuses the answer. Without
`server.cors` there is no policy, and the middleware does nothing more than
one `is None` test.

`Vary: Origin` is on every answer whose headers depend on the origin, that is
whenever the policy lists origins rather than `*`.
"""

from __future__ import annotations

from aiohttp import web

from aiwfd.spec.config import Cors

# Headers a browser script may read beyond the CORS-safelisted ones.
EXPOSE_HEADERS = "X-Request-ID, Retry-After, RateLimit-Policy, RateLimit"


def _origin_key(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class CorsPolicy:
    __slots__ = ("any_origin", "origins", "credentials", "vary", "preflight_headers",
                 "echo_request_headers", "simple_headers")

    def __init__(self, cfg: Cors) -> None:
        self.any_origin = "*" in cfg.allow_origins
        self.origins = frozenset(_origin_key(o) for o in cfg.allow_origins if o != "*")
        self.credentials = cfg.allow_credentials
        # `*` is sent as such only without credentials (the loader refuses
        # `*` with credentials); a listed origin is echoed, so caches must vary.
        self.vary = not self.any_origin
        self.echo_request_headers = "*" in cfg.allow_headers and cfg.allow_credentials
        pre = {
            "Access-Control-Allow-Methods": ", ".join(cfg.allow_methods),
            "Access-Control-Allow-Headers": ", ".join(cfg.allow_headers),
            "Access-Control-Max-Age": str(cfg.max_age),
        }
        simple = {"Access-Control-Expose-Headers": EXPOSE_HEADERS}
        if cfg.allow_credentials:
            pre["Access-Control-Allow-Credentials"] = "true"
            simple["Access-Control-Allow-Credentials"] = "true"
        self.preflight_headers = pre
        self.simple_headers = simple

    def allow_origin(self, origin: str | None) -> str | None:
        """The value of Access-Control-Allow-Origin for this request's Origin, or None."""
        if origin is None:
            return None
        if self.any_origin:
            return "*"
        if _origin_key(origin) in self.origins:
            return origin
        return None

    def preflight(self, request: web.Request) -> web.Response | None:
        """A 204 answer to an allowed preflight; None when it is not one (the router decides)."""
        headers = request.headers
        if "Access-Control-Request-Method" not in headers:
            return None
        allow = self.allow_origin(headers.get("Origin"))
        if allow is None:
            return None
        resp = web.Response(status=204)
        h = resp.headers
        h.update(self.preflight_headers)
        if self.echo_request_headers and "Access-Control-Request-Headers" in headers:
            # With credentials a browser takes `*` literally: name the headers asked for.
            h["Access-Control-Allow-Headers"] = headers["Access-Control-Request-Headers"]
        h["Access-Control-Allow-Origin"] = allow
        if self.vary:
            h.add("Vary", "Origin")
        return resp

    def apply(self, request: web.Request, resp: web.StreamResponse) -> None:
        """The CORS headers of an actual (non-preflight) answer; the preflight has its own."""
        h = resp.headers
        if "Access-Control-Allow-Origin" in h:
            return
        if self.vary:
            h.add("Vary", "Origin")
        allow = self.allow_origin(request.headers.get("Origin"))
        if allow is None:
            return
        h["Access-Control-Allow-Origin"] = allow
        h.update(self.simple_headers)


def policy(cfg: Cors | None) -> CorsPolicy | None:
    return CorsPolicy(cfg) if cfg is not None else None
