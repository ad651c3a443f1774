"""What differs between the Python versions CI runs (3.10 and 3.11+), in one place."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover - the 3.10 run of .ci/run
    from async_timeout import timeout

__all__ = ["timeout"]
