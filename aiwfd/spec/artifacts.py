"""Write the compiled artifacts of SPEC §4.2 to a directory.

    DIR/openapi.json         DIR/agents/<name>.json   DIR/types/<Type>.json

`openapi.json` (aiwfd.spec.openapi) comes in through `extra`: the server passes
the running snapshot's document, `aiwfd compile` one built without knowing
API_KEY.

Each file is written to a temporary name and renamed, so a reader (or a
reload racing a reader) never sees half a file; files of agents and types
that no longer exist are removed. This is blocking I/O: the server runs it
in a thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from aiwfd.spec.compiler import Compiled


# What this process last wrote to each artifact path.
_written: dict[Path, bytes] = {}


def artifact_files(compiled: Compiled) -> dict[str, Any]:
    """Relative path → JSON document, for every artifact."""
    files: dict[str, Any] = {}
    for name, agent in compiled.agents.items():
        files[f"agents/{name}.json"] = agent.artifact()
    for key, schema in compiled.type_schemas.items():
        files[f"types/{key}.json"] = schema
    return files


def write_artifacts(compiled: Compiled, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> list[str]:
    """Write every artifact under `directory`; returns the relative paths written."""
    root = Path(directory)
    files = artifact_files(compiled) | (extra or {})
    for sub in {Path(rel).parent for rel in files} | {Path("agents"), Path("types")}:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for rel, doc in files.items():
        target = root / rel
        # orjson: the pure-Python indenting encoder cost a 200-agent reload ~0.4 s.
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
        # A reload usually changes a few agents: rewriting the other 600 files
        # (open + rename, ~1 ms each on a busy disk) was most of its time.
        if _written.get(target) == data and target.exists():
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        _written[target] = data
    for kind in ("agents", "types"):
        for old in (root / kind).glob("*.json"):
            if f"{kind}/{old.name}" not in files:
                old.unlink(missing_ok=True)
                _written.pop(old, None)
    return sorted(files)
