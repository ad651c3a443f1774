"""The compiled-artifacts directory of a real `aiwfd serve` (SPEC §4.2, §5; issue #3 item 9).

- Without `-o`: a fresh `aiwfd-<pid>-*` directory in the temp dir (TMPDIR,
  isolated per test) holds agents/ and types/, and is removed on SIGTERM and on
  SIGINT, both exiting 0.
- With `-o DIR`: the artifacts are written there, rewritten by a SIGHUP after
  the config changed (an added agent's file appears, a removed one's goes),
  and kept after exit; no temporary directory is made.
- A second SIGINT while the drain waits for a slow request exits at once
  (non-zero) and still removes the ephemeral directory.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from aiwfd.testing.fakeopenai import FakeOpenAI
from tests.process.test_cli_serve import GOOD, MOCK_CFG, OPENAI_CFG, http, launch

MOCK_AGENTS = {"greeter", "chatter"}
MOCK_TYPES = {"GreetingRequest", "GreetingResponse", "Mood"}
ARTIFACT_KEYS = {"agent", "provider", "model", "input_schema", "output_schema"}


def temp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    return root


def names(directory: Path) -> set[str]:
    return {p.stem for p in directory.glob("*.json")}


def check_artifacts(directory: Path, agents: set[str], types: set[str]) -> None:
    assert names(directory / "agents") == agents
    assert names(directory / "types") == types
    for name in agents:
        doc = json.loads((directory / "agents" / f"{name}.json").read_text(encoding="utf-8"))
        assert ARTIFACT_KEYS <= set(doc), doc
        assert doc["agent"] == name
    greeter = json.loads((directory / "agents" / "greeter.json").read_text(encoding="utf-8"))
    assert greeter["response_format"]["type"] == "json_schema"
    assert greeter["response_format"]["json_schema"]["strict"] is True
    if "chatter" in agents:  # no output_type: no response_format
        chatter = json.loads((directory / "agents" / "chatter.json").read_text(encoding="utf-8"))
        assert "response_format" not in chatter
    mood = json.loads((directory / "types" / "Mood.json").read_text(encoding="utf-8"))
    assert mood["enum"] == ["happy", "sad"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ephemeral_dir_lives_as_long_as_the_process(tmp_path: Path, sig: signal.Signals) -> None:
    root = temp_root(tmp_path)
    with launch(["serve", "-f", MOCK_CFG, "-p", "0"], {"TMPDIR": str(root)}, tmp_path) as proc:
        made = list(root.iterdir())
        assert [d.name.startswith(f"aiwfd-{proc.pid}-") for d in made] == [True], made
        check_artifacts(made[0], MOCK_AGENTS, MOCK_TYPES)
        assert http("POST", proc.url("/agent/greeter"), GOOD)[0] == 200
        proc.send(sig)
        rc = proc.wait()
    assert rc == 0, proc.stderr
    assert not made[0].exists()
    assert list(root.iterdir()) == []
    assert "Traceback" not in proc.stderr


def test_output_dir_is_written_rewritten_on_sighup_and_kept(tmp_path: Path) -> None:
    root = temp_root(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "agents.yaml"
    text = Path(MOCK_CFG).read_text(encoding="utf-8")
    cfg.write_text(text, encoding="utf-8")
    with launch(["serve", "-f", str(cfg), "-o", str(out), "-p", "0"], {"TMPDIR": str(root)}, tmp_path) as proc:
        check_artifacts(out, MOCK_AGENTS, MOCK_TYPES)
        assert list(root.iterdir()) == []  # -o: no temporary directory
        # An agent and a type added, an agent removed.
        added = text.replace("  chatter:", "  added:").replace(
            "  Mood: enum(happy, sad)\n", "  Mood: enum(happy, sad)\n  Added:\n    n: int\n")
        assert added != text
        cfg.write_text(added, encoding="utf-8")
        mark = len(proc.lines)
        proc.send(signal.SIGHUP)
        proc.wait_for_log(r"reloaded .*: 2 agents", start=mark)
        check_artifacts(out, {"greeter", "added"}, MOCK_TYPES | {"Added"})
        assert http("POST", proc.url("/agent/added"), GOOD)[0] == 200
        rc = proc.stop()
    assert rc == 0, proc.stderr
    check_artifacts(out, {"greeter", "added"}, MOCK_TYPES | {"Added"})  # kept after exit
    assert list(root.iterdir()) == []


async def test_second_sigint_exits_at_once_and_removes_the_dir(tmp_path: Path) -> None:
    root = temp_root(tmp_path)
    # The fake holds every answer for a minute: the request stays in flight.
    async with FakeOpenAI(latency=60.0) as fake:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.base_url, "TMPDIR": str(root)}
        proc = await asyncio.to_thread(launch, ["serve", "-f", OPENAI_CFG, "-p", "0"], env, tmp_path)
        try:
            made = list(root.iterdir())
            assert len(made) == 1 and made[0].name.startswith(f"aiwfd-{proc.pid}-"), made
            request = asyncio.ensure_future(asyncio.to_thread(http, "POST", proc.url("/agent/greeter"), GOOD, None, 90))
            await fake.wait_calls(1, timeout=20)  # aiwfd is now waiting on the model
            mark = len(proc.lines)
            proc.send(signal.SIGINT)
            await asyncio.to_thread(proc.wait_for_log, r"waiting up to \d+s for 1 in-flight", 20, mark)
            assert proc.proc.poll() is None  # draining, not gone
            started = time.monotonic()
            proc.send(signal.SIGINT)
            rc = await asyncio.to_thread(proc.wait, 10)
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(proc.stop)
        with pytest.raises(OSError):  # the connection died with the process
            await request
    assert rc != 0, proc.stderr
    assert elapsed < 5, elapsed  # not the 30 s shutdown timeout, nor the fake's minute
    assert "second interrupt" in proc.stderr
    assert not made[0].exists()
    assert list(root.iterdir()) == []
