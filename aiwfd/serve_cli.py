"""`aiwfd serve`: its flags, and the hand-over from the command line to the server."""

from __future__ import annotations

import argparse
import gc
from typing import Any

from aiwfd import settings


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve every agent at POST /agent/{name}")
    settings.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    # No cyclic collection until the server is up (Server.serve turns it back
    # on): importing the openai SDK builds ~650 pydantic models and compiling
    # the config ~10^5 containers, and the collections they trigger cost
    # ~0.15-0.2 s of start-up. What they allocate lives as long as the process.
    gc.disable()
    # Imported here: `aiwfd validate` should not pay for the openai SDK's import.
    from aiwfd import logs
    from aiwfd.daemon import server
    s = settings.from_args(args)
    logs.setup(s.log_format, s.log_level)
    return server.run(s)
