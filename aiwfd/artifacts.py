"""Write the compiled artifacts of SPEC §4.2 to a directory.

    DIR/openapi.json         DIR/agents/<name>.json   DIR/types/<Type>.json

`openapi.json` (aiwfd.openapi) comes in through `extra`: the server passes
the running snapshot's document, `aiwfd compile` one built without knowing
API_KEY.

Each file is written to a temporary name and renamed, so a reader (or a
reload racing a reader) never sees half a file; files of agents and types
that no longer exist are removed. This is blocking I/O: the server runs it
in a thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aiwfd.compiler import Compiled


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
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    for sub in ("agents", "types"):
        for old in (root / sub).glob("*.json"):
            if f"{sub}/{old.name}" not in files:
                old.unlink(missing_ok=True)
    return sorted(files)
