"""What verifying a bearer token can fail with, apart from the verifier, so that
the HTTP layer maps them without importing PyJWT on every start (it is loaded
only with auth.jwt: aiwfd.auth.jwt)."""

from __future__ import annotations


class TokenError(Exception):
    """The token is refused: 401 invalid_token. ``description`` is short and safe
    for error_description: it never quotes the token or a claim."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class KeysUnavailable(Exception):
    """No key set could be loaded yet (the issuer is down since start-up): 503."""
