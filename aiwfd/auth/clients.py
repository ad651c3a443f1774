"""The clients a request can be (SPEC §8.1) and the table API keys are found in.

A key is found by its SHA-256 digest: the table never holds a key, only
digests (which `key_sha256` lets the agents file carry), and a lookup compares
the digest it found in constant time. Neither a key nor a digest ever reaches
a log line or an answer: `Client` holds neither.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Mapping

from aiwfd.errors import StartupError
from aiwfd.spec.access import API_KEY_CLIENT, AuthConfig, LimitSet

# The one identity of `API_KEY`'s keys (with a ':', which no configured name has).
API_KEY_IDENTITY = "env:API_KEY"


@dataclass(frozen=True)
class Client:
    name: str                 # the request log's client=
    label: str                # the metrics label: bounded (a key's name, "jwt", "anonymous")
    agents: frozenset[str] | None = None  # the allowlist; None: every agent
    limits: LimitSet | None = None        # its own; None: `limits.default`
    scopes: frozenset[str] | None = None  # a JWT's scopes
    # The identity of every key of `API_KEY`: its keys are one client being
    # rotated (SPEC §8.1), so its jobs, counters and idempotency keys must
    # survive the rotation, whichever of the keys calls.
    shared_identity: str | None = None

    @property
    def identity(self) -> str:
        """What the store keys its counters, idempotency keys and jobs by. A
        token's client claim is the caller's to choose: "jwt:" keeps a token
        naming itself `frontend` from being the key client `frontend` (a
        configured name has no ':')."""
        if self.shared_identity is not None:
            return self.shared_identity
        return "jwt:" + self.name if self.label == "jwt" else self.name

    def may_call(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents


ANONYMOUS = Client("anonymous", "anonymous")


class KeyTable:
    """SHA-256 digest → client, for `API_KEY` and `auth.keys`."""

    def __init__(self, entries: Mapping[bytes, Client]) -> None:
        self._by_digest = {d: (d, c) for d, c in entries.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def find(self, given: bytes) -> Client | None:
        digest = hashlib.sha256(given).digest()
        found = self._by_digest.get(digest)
        # The dict finds it by hash (of a digest, which tells nothing of the key);
        # the digest is then compared in constant time, as SPEC §8.1 asks.
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]

    def by_identity(self, identity: str) -> Client | None:
        """A key client whose `identity` this is (a job's submitter, found again when it runs)."""
        return next((c for _, c in self._by_digest.values() if c.identity == identity), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for _, c in self._by_digest.values())


def key_table(auth: AuthConfig, api_keys: tuple[bytes, ...], env: Mapping[str, str]) -> KeyTable:
    """The table for one load; StartupError names a `key_env` that is not set."""
    entries: dict[bytes, Client] = {}
    for i, key in enumerate(api_keys, 1):
        name = API_KEY_CLIENT.format(i)
        entries.setdefault(hashlib.sha256(key).digest(), Client(name, name, shared_identity=API_KEY_IDENTITY))
    for k in auth.keys:
        if k.key_env is not None:
            value = env.get(k.key_env, "").strip()
            if not value:
                raise StartupError(f"auth.keys: client {k.name!r}: the environment variable {k.key_env} "
                                   "is not set (put it in the environment or the .env file)")
            digest = hashlib.sha256(value.encode("utf-8")).digest()
        else:
            assert k.key_sha256 is not None
            digest = bytes.fromhex(k.key_sha256)
        other = entries.get(digest)
        if other is not None:
            raise StartupError(f"auth.keys: clients {other.name!r} and {k.name!r} have the same key")
        entries[digest] = Client(k.name, k.name, frozenset(k.agents) if k.agents is not None else None, k.limits)
    return KeyTable(entries)
