"""ruff (pyflakes and bugbear) and mypy over aiwfd/ are clean: part of the suite, so CI fails on them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean() -> None:
    assert shutil.which("ruff") or run("ruff", "--version").returncode == 0, "pip install -e '.[test]'"
    out = run("ruff", "check", "--no-cache", "aiwfd")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean() -> None:
    # setup.cfg [mypy] names the files and the settings.
    # Incremental, in .mypy_cache: a warm run of the inner loop takes ~1 s instead
    # of ~10 s; a clean checkout (CI) checks everything cold.
    out = run("mypy")
    assert out.returncode == 0, out.stdout + out.stderr
