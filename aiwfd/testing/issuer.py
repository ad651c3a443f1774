"""A small real OpenID Connect issuer for tests and benchmarks: discovery, a JWKS
with Cache-Control, RSA and EC keys made with ``cryptography``, rotation, and
going down on demand. It mints the tokens the tests present.

In-process (also from a process test: the issuer can serve the aiwfd child
from the test's own event loop)::

    async with Issuer(max_age=600) as iss:
        settings = JWTSettings(issuer=iss.issuer, audience=iss.audience)
        token = iss.mint(scope="aiwfd:greeter")            # RS256, the current key
        token = iss.mint(alg="ES256", lifetime=-120)        # an expired ES256 token
        kid = iss.rotate("RS256", keep=False)               # a new signing key; the old one unpublished
        iss.down(); iss.up()                                # 503 (or refuse=True: connections refused)

As a separate process (prints ``LISTENING <port>`` once, serves until SIGTERM)::

    python -m aiwfd.testing.issuer --port 0 [--max-age N] [--audience A] [--path /realms/test]

which adds test-only control routes under the issuer URL: ``POST /mint``
(JSON ``{"claims", "alg", "kid", "lifetime", "overrides"}``, answers the token
as text), ``POST /rotate`` (``{"alg", "keep"}``, answers the new kid),
``POST /down`` and ``POST /up`` (the 503 kind of down: a refusing issuer could
not be told to come back).

Routes, under the issuer URL ``http://127.0.0.1:<port><path>``:
``/.well-known/openid-configuration`` and ``/jwks``. Depends on aiohttp,
cryptography and PyJWT only (not on the rest of aiwfd), so that it stands for
any issuer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = ["Issuer"]

_CURVES: dict[str, ec.EllipticCurve] = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass
class _Key:
    kid: str
    alg: str
    private: Any  # an RSA, EC or Ed25519 private key of cryptography
    jwk: dict[str, Any]  # the public JWK the issuer publishes

    def public_pem(self) -> bytes:
        return bytes(self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _new_key(alg: str, kid: str) -> _Key:
    """A fresh key pair for `alg`, with its public JWK (kid, alg, use=sig)."""
    private: Any
    if alg[:2] in ("RS", "PS"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg in _CURVES:
        private = ec.generate_private_key(_CURVES[alg])
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(f"the test issuer makes no {alg} keys")
    jwk.update(kid=kid, alg=alg, use="sig")
    return _Key(kid, alg, private, jwk)


class Issuer:
    """An OIDC issuer on loopback; see the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/realms/test",
        audience: str = "aiwfd",
        client: str = "test-client",
        scope: str = "openid aiwfd:*",
        max_age: int | None = 300,
        algorithms: tuple[str, ...] = ("RS256", "ES256"),
        control: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.path = path.rstrip("/")
        self.audience = audience
        self.client = client  # the default sub and azp
        self.scope = scope  # the default scope claim
        self.max_age = max_age  # Cache-Control: max-age of the JWKS; None: no Cache-Control
        self.cache_control: str | None = None  # when set, sent verbatim instead of max-age
        self.jwks_body: bytes | None = None  # when set, served verbatim as the JWKS (a broken issuer)
        self.clock = clock  # iat / nbf / exp of minted tokens
        self.discovery_requests = 0
        self.jwks_requests = 0
        self._control = control
        self._keys: dict[str, _Key] = {}  # published, in order
        self._signing: dict[str, str] = {}  # alg -> kid of the key that signs it
        self._serial = 0
        self._down = False
        self._runner: web.AppRunner | None = None
        for alg in algorithms:
            self.rotate(alg)

    # -- lifecycle ---------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The issuer URL: the `iss` of minted tokens and the base of discovery."""
        return f"http://{self.host}:{self.port}{self.path}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(f"{self.path}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{self.path}/jwks", self._jwks)
        if self._control:
            app.router.add_post(f"{self.path}/mint", self._mint)
            app.router.add_post(f"{self.path}/rotate", self._rotate)
            app.router.add_post(f"{self.path}/down", self._set_down)
            app.router.add_post(f"{self.path}/up", self._set_up)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        # The same port after a refusing down(): the verifier's URLs must stay valid.
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Issuer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- test controls -----------------------------------------------------

    async def down(self, *, refuse: bool = False) -> None:
        """Discovery and JWKS answer 503; with refuse=True the port is closed, and
        its keep-alive connections with it, so that connecting is refused."""
        self._down = True
        if refuse:
            await self.close()

    async def up(self) -> None:
        """Serve again (after a refusing down(), on the same port)."""
        self._down = False
        if self._runner is None:
            await self.start()

    @property
    def is_down(self) -> bool:
        return self._down

    def rotate(self, alg: str = "RS256", *, keep: bool = True) -> str:
        """A new key signs `alg` from now on; the previous one stays published
        (keep=True, as issuers do during a rotation) or is dropped. The new kid."""
        self._serial += 1
        key = _new_key(alg, f"{alg.lower()}-{self._serial}")
        old = self._signing.get(alg)
        if old is not None and not keep:
            del self._keys[old]
        self._keys[key.kid] = key
        self._signing[alg] = key.kid
        return key.kid

    def drop(self, kid: str) -> None:
        """Unpublish a key (it keeps signing if it is the current one: a forged-looking token)."""
        del self._keys[kid]

    def signing_kid(self, alg: str = "RS256") -> str:
        return self._signing[alg]

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self._keys.values()]}

    def public_pem(self, kid: str | None = None) -> bytes:
        """The PEM of a published key (default: the RS256 signing key): the
        secret of the HS256 algorithm-confusion attack."""
        return self._keys[kid or self._signing["RS256"]].public_pem()

    # -- tokens ------------------------------------------------------------

    def claims(self, *, lifetime: float = 300) -> dict[str, Any]:
        """The default claims of a minted token."""
        now = int(self.clock())
        return {"iss": self.issuer, "aud": self.audience, "sub": self.client, "azp": self.client,
                "iat": now, "nbf": now, "exp": now + int(lifetime), "scope": self.scope}

    def mint(
        self,
        claims: dict[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        lifetime: float = 300,
        headers: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        """A signed token. `claims` replaces the defaults (self.claims()) when given;
        `overrides` then set claims, None removing one (``mint(exp=None)``).

        - kid: a published kid signs with that key; an unknown one puts that kid
          in the header and signs with the current key of `alg` (an unknown-kid token).
        - alg="none": unsigned. alg="HS256"/"HS384"/"HS512": HMAC with the PEM of the
          RSA public key as the secret (the algorithm-confusion attack), kid of that key.
        - headers: extra header fields, None removing one (``headers={"kid": None}``).
        """
        payload = dict(claims) if claims is not None else self.claims(lifetime=lifetime)
        for name, value in overrides.items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        sign: Callable[[bytes], bytes] | None = None
        if alg == "none":
            pass
        elif alg.startswith("HS"):
            rsa_key = self._keys[kid] if kid in self._keys else self._keys[self._signing["RS256"]]
            header["kid"] = rsa_key.kid
            secret = rsa_key.public_pem()
            digest = getattr(hashlib, "sha" + alg[2:])

            def sign(data: bytes) -> bytes:
                return hmac.new(secret, data, digest).digest()
        else:
            key = self._keys.get(kid) if kid is not None else None
            if key is None or key.alg != alg:
                key = self._keys[self._signing[alg]]
            header["kid"] = kid if kid is not None else key.kid
            algorithm = jwt.get_algorithm_by_name(alg)
            private = key.private

            def sign(data: bytes) -> bytes:
                return algorithm.sign(data, private)
        for name, value in (headers or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        signing_input = f"{_b64(_compact(header))}.{_b64(_compact(payload))}"
        signature = sign(signing_input.encode("ascii")) if sign is not None else b""
        return f"{signing_input}.{_b64(signature)}"

    # -- handlers ----------------------------------------------------------

    def _unavailable(self) -> web.Response:
        return web.json_response({"error": "temporarily_unavailable"}, status=503)

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_requests += 1
        if self._down:
            return self._unavailable()
        return web.json_response({
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self._keys.values()}),
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_requests += 1
        if self._down:
            return self._unavailable()
        headers = {}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        elif self.max_age is not None:
            headers["Cache-Control"] = f"public, max-age={self.max_age}"
        if self.jwks_body is not None:
            return web.Response(body=self.jwks_body, headers=headers, content_type="application/json")
        return web.json_response(self.jwks(), headers=headers, content_type="application/jwk-set+json")

    async def _mint(self, request: web.Request) -> web.Response:
        body = await request.json()
        token = self.mint(body.get("claims"), alg=body.get("alg", "RS256"), kid=body.get("kid"),
                          lifetime=body.get("lifetime", 300), headers=body.get("headers"),
                          **body.get("overrides", {}))
        return web.Response(text=token)

    async def _rotate(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else {}
        return web.Response(text=self.rotate(body.get("alg", "RS256"), keep=body.get("keep", True)))

    async def _set_down(self, request: web.Request) -> web.Response:
        self._down = True
        return web.Response(text="down")

    async def _set_up(self, request: web.Request) -> web.Response:
        self._down = False
        return web.Response(text="up")


async def _serve(args: argparse.Namespace) -> None:
    issuer = Issuer(host=args.host, port=args.port, path=args.path, audience=args.audience,
                    max_age=args.max_age, control=True)
    await issuer.start()
    print(f"LISTENING {issuer.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await issuer.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m aiwfd.testing.issuer", description="A small OIDC issuer for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--path", default="/realms/test")
    parser.add_argument("--audience", default="aiwfd")
    parser.add_argument("--max-age", type=int, default=300)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
