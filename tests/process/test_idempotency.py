"""An Idempotency-Key whose first request died with its instance (SPEC §9.4):
real `aiwfd serve` processes, the first killed with SIGKILL while the fake
model holds its call. A second instance sharing the state directory (SQLite)
or the Redis answers 409 until the first's lease (deadline + margin) has
passed, then runs the request itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from aiwfd.http.idempotency import LEASE_MARGIN
from aiwfd.testing.fakeopenai import FakeOpenAI, Hold
from aiwfd.testing.processes import AiwfdProcess, started
from aiwfd.testing.redisproc import RedisServer

DEADLINE = 0.5
LEASE = DEADLINE + LEASE_MARGIN
CONFIG = """\
version: 0.3
providers:
  fake:
    base_url: {url}
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
"""


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def post(session: aiohttp.ClientSession, proc: AiwfdProcess, key: str) -> tuple[int, dict[str, str], Any]:
    async with session.post(proc.url("/agent/greeter"), json={"name": "Ann"},
                            headers={"Idempotency-Key": key}) as r:
        return r.status, dict(r.headers), await r.json()


# system: four `aiwfd serve` processes, a SIGKILL, and the lease's fixed 3 s margin
# (LEASE_MARGIN, not a setting) waited out in real time: ~4 s. The inner loop keeps the
# lease's expiry on both stores (tests/http/test_idempotency.py, store leases).
@pytest.mark.system
async def test_a_killed_first_request_frees_its_key_after_its_lease(tmp_path: Path,
                                                                   redis_server: RedisServer) -> None:
    """Both stores at once (each with its own processes and fake model): the
    lease is real time passing, and they can pass it together."""
    await asyncio.gather(killed_first(tmp_path / "sqlite", ["--state-dir", str(tmp_path / "state")]),
                         killed_first(tmp_path / "redis", ["--redis-url", redis_server.url]))


async def killed_first(tmp_path: Path, store: list[str]) -> None:
    kind = "redis" if "--redis-url" in store else "sqlite"
    tmp_path.mkdir()
    async with FakeOpenAI() as fake:
        config = tmp_path / "agents.yaml"
        config.write_text(CONFIG.format(url=fake.base_url), encoding="utf-8")
        args = ["serve", "-f", str(config), "-p", "0", "--deadline", str(DEADLINE), *store]
        env = {"FAKE_KEY": "sk-fake", "TMPDIR": str(tmp_path)}
        key = f"killed-{time.monotonic_ns()}"
        gate = asyncio.Event()
        fake.script(Hold(gate))
        async with started(args, env) as first, started(args, env) as second, aiohttp.ClientSession() as session:
            held = asyncio.ensure_future(post(session, first, key))
            await fake.wait_calls(1)
            claimed = time.monotonic()  # the key was taken before the model was called
            first.send(signal.SIGKILL)  # long before its deadline could answer 504
            await asyncio.to_thread(first.wait, 10)
            with pytest.raises(aiohttp.ClientError):
                await held
            answers = []
            while True:
                status, headers, doc = await post(session, second, key)
                answers.append((round(time.monotonic() - claimed, 2), status))
                if status != 409:
                    break
                assert headers["Retry-After"] == "1" and doc["error"]["type"] == "conflict"
                assert time.monotonic() - claimed < LEASE + 5, answers
                await asyncio.sleep(0.1)  # what is tested is time passing: poll at a fine grain
            freed = time.monotonic() - claimed
            print(f"IDEMPOTENCY ({kind}): key of a killed request freed {freed:.2f}s after its claim "
                  f"(lease {LEASE:g}s); {len(answers) - 1} answers 409 before")
            assert answers[0][1] == 409, answers
            assert status == 200 and "Idempotency-Replayed" not in headers, (status, doc)
            assert freed >= LEASE - 0.5, answers  # not before the lease (the claim came a little before `claimed`)
            assert fake.calls == 2
            status, headers, _ = await post(session, second, key)
            assert status == 200 and headers["Idempotency-Replayed"] == "true"
            assert fake.calls == 2
