"""SIGHUP reload (SPEC §5): under load, invalid configs, rotated keys, old provider clients closed.

Real `aiwfd serve` processes talk to an in-process FakeOpenAI, so every
blocking wait on the process goes through a thread (the loop serves the fake).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import aiohttp
import orjson

from aiwfd.testing.fakeopenai import DEFAULT_TEXT, FakeOpenAI, Hold, RecordedRequest
from aiwfd.testing.inprocess import fake_env, serve
from aiwfd.testing.metrics import delta
from aiwfd.testing.processes import AiwfdProcess, started
from tests.conftest import CONFIGS

HEADER = """\
version: 0.3
types:
  GreetingRequest:
    name: string(1..100)
  GreetingResponse:
    message: string
assistants:
  greeter:
    use: openai
    model: gpt-4o-mini
    system_prompt: "{prompt}"
    input_type: GreetingRequest
    output_type: GreetingResponse
"""

EXTRA_AGENT = """\
  {name}:
    use: openai
    model: gpt-4o-mini
    system_prompt: "{name} prompt"
    input_type: GreetingRequest
"""


BAD_PROVIDER = (CONFIGS / "life_bad_provider.yaml").read_text(encoding="utf-8")


def config_text(prompt: str, extra_agents: Iterable[str] = ()) -> str:
    return HEADER.format(prompt=prompt) + "".join(EXTRA_AGENT.format(name=n) for n in extra_agents)


def replace_file(path: Path, text: str) -> None:
    """Write as an operator's tooling should: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)




async def wait_log(proc: AiwfdProcess, pattern: str, start: int = 0, timeout: float = 20.0) -> str:
    return await asyncio.to_thread(proc.wait_for_log, pattern, timeout, start)


async def post(session: aiohttp.ClientSession, url: str, name: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with session.post(url, json={"name": name}, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


def request_for(fake: FakeOpenAI, name: str) -> RecordedRequest:
    """The model request the server made for the call whose input was {"name": name}."""
    user = orjson.dumps({"name": name}).decode()
    found = [r for r in fake.requests if r.messages and r.messages[-1].get("content") == user]
    assert len(found) == 1, f"{len(found)} model requests for {name!r}"
    return found[0]


def system_prompt(req: RecordedRequest) -> str:
    assert req.messages[0]["role"] == "system"
    return str(req.messages[0]["content"])


# ---------------------------------------------------------------- under load


async def test_sighup_under_load_drops_nothing_and_uses_the_new_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, config_text("prompt v0"))
    env = {"TMPDIR": str(tmp_path)}
    async with FakeOpenAI() as fake, started(["serve", "-f", str(cfg), "-p", "0"],
                                           {**fake_env(fake), **env}) as proc:
        pid = proc.pid
        url = proc.url
        statuses: Counter[int] = Counter()
        failures: list[Any] = []
        stop = asyncio.Event()

        async def load(session: aiohttp.ClientSession, k: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    status, body = await post(session, url("/agent/greeter"), f"load-{k}-{i}")
                    statuses[status] += 1
                    if status != 200:
                        failures.append((status, body))
                except aiohttp.ClientError as e:  # a dropped or refused request
                    failures.append(repr(e))
                i += 1

        async with aiohttp.ClientSession() as session:
            workers = [asyncio.create_task(load(session, k)) for k in range(8)]
            try:
                await fake.wait_calls(16, timeout=30)
                # 20 reloads, one at a time, each with a changed prompt and an added agent.
                for i in range(1, 21):
                    replace_file(cfg, config_text(f"prompt v{i}", [f"added{i}"]))
                    mark = len(proc.lines)
                    proc.send(signal.SIGHUP)
                    await wait_log(proc, r"reloaded .*: 2 agents$", mark)
                    status, body = await post(session, url("/agent/greeter"), f"probe-{i}")
                    assert status == 200, body
                    assert system_prompt(request_for(fake, f"probe-{i}")) == f"prompt v{i}"
                    status, body = await post(session, url(f"/agent/added{i}"), f"added-{i}")
                    assert status == 200 and body["data"] == DEFAULT_TEXT, body
                    assert system_prompt(request_for(fake, f"added-{i}")) == f"added{i} prompt"
                    if i > 1:  # the agent the new file no longer has is gone
                        status, body = await post(session, url(f"/agent/added{i - 1}"), "gone")
                        assert status == 404 and body["error"]["type"] == "not_found"
                calls_before_burst = sum(statuses.values())

                # 100 SIGHUPs within one second, without waiting; the file changes halfway.
                began = time.monotonic()
                for n in range(100):
                    if n == 50:
                        replace_file(cfg, config_text("prompt v21", ["added21"]))
                    proc.send(signal.SIGHUP)
                    await asyncio.sleep(max(0.0, began + (n + 1) * 0.005 - time.monotonic()))  # pacing
                assert time.monotonic() - began < 1.0

                # A last change: a reload always starts after the last signal, so this one lands.
                replace_file(cfg, config_text("prompt final", ["added21", "late"]))
                mark = len(proc.lines)
                proc.send(signal.SIGHUP)
                await wait_log(proc, r"reloaded .*: 3 agents$", mark)
                status, body = await post(session, url("/agent/greeter"), "probe-final")
                assert status == 200
                assert system_prompt(request_for(fake, "probe-final")) == "prompt final"
                status, body = await post(session, url("/agent/late"), "late-1")
                assert status == 200, body
                await fake.wait_calls(fake.calls + 16, timeout=30)  # the load is still flowing
            finally:
                stop.set()
                await asyncio.gather(*workers)

            assert failures == []
            assert set(statuses) == {200}
            assert sum(statuses.values()) > calls_before_burst > 16

            # Same process, still healthy, never restarted.
            assert proc.proc.poll() is None and proc.pid == pid
            async with session.get(url("/health")) as r:
                assert r.status == 200
                health = orjson.loads(await r.read())
            assert health["status"] == "ok" and health["agents"] == 3
        assert len([ln for ln in proc.lines if " serving " in ln]) == 1
        # 20 one at a time, at least one for the burst, the last one. How many
        # the burst makes is not this test's to say: a reload of this small file
        # takes under the 5 ms between two signals (measured: 93 to 100 reloads
        # for the 100 signals), and signals sent back to back merge in the
        # kernel. The coalescing itself: test_a_burst_of_sighups_is_one_reload.
        assert len([ln for ln in proc.lines if "reloaded" in ln]) >= 22
        assert not [ln for ln in proc.lines if "reload failed" in ln or "Traceback" in ln]
        assert await asyncio.to_thread(proc.stop) == 0


async def test_a_burst_of_sighups_is_one_reload(tmp_path: Path) -> None:
    """SIGHUPs that come before a reload has begun reading the file ask for
    nothing more (SPEC §5): that reload reads what they announced. 100 of them
    cost one reload, not 100."""
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, config_text("prompt v0"))
    async with FakeOpenAI() as fake, serve(cfg, env=fake_env(fake)) as srv:
        before = await srv.scrape()
        replace_file(cfg, config_text("prompt v1", ["added1"]))
        # What loop.add_signal_handler runs for each SIGHUP, called here without
        # yielding to the loop: the first starts a reload task, the other 99
        # come before it has run.
        for _ in range(100):
            srv.server.on_sighup()
        task = srv.server._reload_task
        assert task is not None
        await task
        after = await srv.scrape()
        assert delta(before, after, "aiwfd_config_reloads_total", result="ok") == 1
        assert delta(before, after, "aiwfd_config_reloads_total", result="error") == 0
        status, body = await post(srv.session, srv.url("/agent/added1"), "after-burst")
        assert status == 200, body
        assert system_prompt(request_for(fake, "after-burst")) == "added1 prompt"


# ---------------------------------------------------------------- invalid config


async def test_invalid_config_on_sighup_logs_every_error_and_keeps_serving(tmp_path: Path) -> None:
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, (CONFIGS / "life_basic.yaml").read_text())
    async with FakeOpenAI() as fake, started(["serve", "-f", str(cfg), "-p", "0"],
                                           {**fake_env(fake), "TMPDIR": str(tmp_path)}) as proc:
        async with aiohttp.ClientSession() as session:
            assert (await post(session, proc.url("/agent/greeter"), "before"))[0] == 200

            replace_file(cfg, (CONFIGS / "life_invalid.yaml").read_text())
            mark = len(proc.lines)
            proc.send(signal.SIGHUP)
            summary = await wait_log(proc, r"reload failed", mark)
            assert "3 errors" in summary and "previous config" in summary
            errors = [ln for ln in proc.lines[mark:] if re.search(r"reload: .*agents\.yaml:\d+: ", ln)]
            assert len(errors) == 3, proc.lines[mark:]
            expected = [(17, "assistants.broken: missing key 'model'"),
                        (19, "assistants.broken.modle: unknown key (did you mean 'model'?)"),
                        (21, "assistants.broken.input_type: unknown type 'NoSuchType'")]
            for line, (lineno, message) in zip(errors, expected):
                assert f"{cfg}:{lineno}: {message}" in line

            # The old config keeps serving; the invalid file's new agent does not exist.
            status, body = await post(session, proc.url("/agent/greeter"), "after-invalid")
            assert status == 200, body
            assert system_prompt(request_for(fake, "after-invalid")) == "Generate a friendly greeting"
            status, body = await post(session, proc.url("/agent/newcomer"), "x")
            assert status == 404 and body["error"]["type"] == "not_found"

            # Valid YAML, but a provider the HTTP client cannot be built for: also refused.
            replace_file(cfg, BAD_PROVIDER)
            mark = len(proc.lines)
            proc.send(signal.SIGHUP)
            line = await wait_log(proc, r"reload failed", mark)
            assert "bad-url" in line and "previous config" in line
            status, body = await post(session, proc.url("/agent/greeter"), "after-bad-url")
            assert status == 200, body
            assert (await post(session, proc.url("/agent/other"), "x"))[0] == 404

            # Fixed again: the next SIGHUP takes it.
            replace_file(cfg, config_text("fixed", ["newcomer"]))
            mark = len(proc.lines)
            proc.send(signal.SIGHUP)
            await wait_log(proc, r"reloaded .*: 2 agents$", mark)
            assert (await post(session, proc.url("/agent/newcomer"), "x"))[0] == 200
        assert proc.proc.poll() is None
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- .env rotation


async def test_rotated_keys_in_env_file_take_effect_on_sighup(tmp_path: Path) -> None:
    cfg = CONFIGS / "life_basic.yaml"
    env_file = tmp_path / "aiwfd.env"
    replace_file(env_file, "API_KEY=old-client-key\nOPENAI_API_KEY=sk-old-upstream\n")
    async with FakeOpenAI(api_key="sk-old-upstream") as fake, \
            started(["serve", "-f", str(cfg), "-p", "0", "--env-file", str(env_file)],
                  {"OPENAI_BASE_URL": fake.base_url, "TMPDIR": str(tmp_path)}) as proc:
        url = proc.url("/agent/greeter")
        old, new = {"X-API-Key": "old-client-key"}, {"Authorization": "Bearer new-client-key"}
        async with aiohttp.ClientSession() as session:
            assert (await post(session, url, "no-key"))[0] == 401
            assert (await post(session, url, "old-1", old))[0] == 200
            assert (await post(session, url, "new-1", new))[0] == 401
            assert request_for(fake, "old-1").headers["authorization"] == "Bearer sk-old-upstream"

            # Both keys rotated in the file (the provider's too).
            replace_file(env_file, "API_KEY=new-client-key\nOPENAI_API_KEY=sk-new-upstream\n")
            fake.api_key = "sk-new-upstream"
            mark = len(proc.lines)
            proc.send(signal.SIGHUP)
            await wait_log(proc, r"reloaded ", mark)

            status, body = await post(session, url, "old-2", old)
            assert status == 401 and body["error"]["type"] == "unauthorized"
            status, body = await post(session, url, "new-2", new)
            assert status == 200, body
            assert request_for(fake, "new-2").headers["authorization"] == "Bearer sk-new-upstream"
        # Keys are never logged.
        for secret in ("old-client-key", "new-client-key", "sk-old-upstream", "sk-new-upstream"):
            assert secret not in proc.stderr


# ---------------------------------------------------------------- old provider clients


def established_to(pid: int, port: int) -> int:
    """TCP connections process `pid` holds open (ESTABLISHED) to 127.0.0.1:`port`, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = row.split()
        remote_port = int(cols[2].split(":")[1], 16)
        if remote_port == port and cols[3] == "01" and cols[9] in inodes:
            count += 1
    return count


async def test_reload_closes_the_old_provider_clients_seen_from_outside(tmp_path: Path) -> None:
    # With the SDK transport every snapshot's AsyncOpenAI has its own connection
    # pool, so a client left open after a reload shows as a connection that stays.
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, config_text("v0"))
    async with FakeOpenAI() as fake, \
            started(["serve", "-f", str(cfg), "-p", "0"],
                  {**fake_env(fake), "AIWF_TRANSPORT": "sdk", "TMPDIR": str(tmp_path)}) as proc:
        async with aiohttp.ClientSession() as session:
            for i in range(4):
                if i:
                    replace_file(cfg, config_text(f"v{i}"))
                    mark = len(proc.lines)
                    proc.send(signal.SIGHUP)
                    await wait_log(proc, r"reloaded ", mark)
                assert (await post(session, proc.url("/agent/greeter"), f"n{i}"))[0] == 200
                # One kept-alive connection: the current client's. The old ones were closed.
                assert established_to(proc.pid, fake.port) == 1
            assert system_prompt(request_for(fake, "n3")) == "v3"


async def test_previous_snapshot_closes_when_its_last_request_ends(tmp_path: Path) -> None:
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, config_text("old prompt"))
    async with FakeOpenAI() as fake:
        async with serve(cfg, env=fake_env(fake)) as srv:
            rt = srv.server.runtime
            assert rt is not None
            old = rt.snapshot
            old_client = old.clients["openai"]
            answer = asyncio.Event()
            fake.script(Hold(answer))  # in flight until the reload below is checked
            running = asyncio.create_task(post(srv.session, srv.url("/agent/greeter"), "in-flight"))
            await fake.wait_calls(1, timeout=30)
            assert old.inflight == 1

            replace_file(cfg, config_text("new prompt"))
            # A rotated key: the new snapshot needs a client of its own. (In
            # process, the environment a reload starts from is the one serve() got.)
            srv.server._base_env["OPENAI_API_KEY"] = "sk-rotated-key"
            assert await srv.server.reload() is True
            assert rt.snapshot is not old and old.retired
            assert rt.snapshot.clients["openai"] is not old_client
            # Its request is still running: not closed yet.
            assert fake.inflight == 1 and old.inflight == 1
            assert not old.closed and not old_client.closed
            # New requests take the new config meanwhile.
            status, _ = await post(srv.session, srv.url("/agent/greeter"), "after-reload")
            assert status == 200
            assert system_prompt(request_for(fake, "after-reload")) == "new prompt"
            assert not old.closed

            answer.set()
            status, body = await running
            assert status == 200, body  # finished on the old config
            assert system_prompt(request_for(fake, "in-flight")) == "old prompt"
            await asyncio.gather(*list(rt._closing))
            assert old.inflight == 0 and old.closed and old_client.closed
            assert not rt.snapshot.closed

            # Nothing in flight: the replaced snapshot closes right away.
            current = rt.snapshot
            assert await srv.server.reload() is True
            await asyncio.gather(*list(rt._closing))
            assert current.closed and not rt.snapshot.closed


async def test_a_client_with_unchanged_settings_is_kept_across_reloads(tmp_path: Path) -> None:
    """Same provider, key and base URL: the next snapshot reuses the client (and
    its pooled connections); closing the replaced snapshot leaves it open."""
    cfg = tmp_path / "agents.yaml"
    replace_file(cfg, config_text("old prompt"))
    async with FakeOpenAI() as fake:
        async with serve(cfg, env=fake_env(fake)) as srv:
            rt = srv.server.runtime
            assert rt is not None
            old = rt.snapshot
            client = old.clients["openai"]
            replace_file(cfg, config_text("new prompt"))
            assert await srv.server.reload() is True
            await asyncio.gather(*list(rt._closing))
            assert old.closed and rt.snapshot.clients["openai"] is client
            assert not client.closed
            status, _ = await post(srv.session, srv.url("/agent/greeter"), "after-reload")
            assert status == 200
            assert system_prompt(request_for(fake, "after-reload")) == "new prompt"
            assert request_for(fake, "after-reload").headers["authorization"] == "Bearer sk-test-openai-key"

            srv.server._base_env["OPENAI_API_KEY"] = "sk-rotated-key"
            assert await srv.server.reload() is True
            await asyncio.gather(*list(rt._closing))
            assert rt.snapshot.clients["openai"] is not client and client.closed
            status, _ = await post(srv.session, srv.url("/agent/greeter"), "rotated")
            assert status == 200
            assert request_for(fake, "rotated").headers["authorization"] == "Bearer sk-rotated-key"


async def test_unchanged_config_is_not_recompiled_but_a_changed_import_is(tmp_path: Path) -> None:
    """A SIGHUP that only rotates .env reuses the compiled config; a change in
    any file it was read from (here an imported one) is compiled again."""
    (tmp_path / "lib.yaml").write_text("types:\n  Out:\n    message: string\n", encoding="utf-8")
    cfg = tmp_path / "agents.yaml"
    cfg.write_text("imports:\n  - as: lib\n    path: lib.yaml\nassistants:\n"
                   "  a:\n    use: mock\n    model: m\n    output_type: $lib.Out\n", encoding="utf-8")
    async with serve(cfg, mock=True) as srv:
        first = srv.server.runtime.snapshot
        assert await srv.server.reload()
        second = srv.server.runtime.snapshot
        assert second is not first and second.compiled is first.compiled
        (tmp_path / "lib.yaml").write_text("types:\n  Out:\n    message: string\n    score: int\n",
                                           encoding="utf-8")
        assert await srv.server.reload()
        third = srv.server.runtime.snapshot
        assert third.compiled is not first.compiled
        async with srv.session.post(srv.url("/agent/a"), json={}) as r:
            assert r.status == 200
            assert set((await r.json())["data"]) == {"message", "score"}
