"""The import rules of docs/architecture.md, enforced.

Top to bottom: cli -> daemon -> http -> engine -> providers -> settings/spec
-> logs, errors. A layer may import the layers below it, never one above.
Checked two ways: statically over every module's imports (ast, so a function-
level import counts too), and by importing `aiwfd.spec` in a fresh interpreter
to see what it drags in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "aiwfd"

# Lower number = lower layer. A module may import only modules of its own
# layer or a lower one (`testing` is imported by the tests, never by aiwfd).
LAYERS: dict[str, int] = {
    "errors": 0, "logs": 0, "compat": 0, "__init__": 0, "telemetry": 0,
    "spec": 1, "settings": 1,
    "providers": 2, "store": 2, "auth": 2, "jobs": 2,
    "engine": 3,
    "http": 4,
    "daemon": 5,
    "cli": 6, "serve_cli": 6, "__main__": 6,
}


def layer_of(module: str) -> str | None:
    """'aiwfd.http.views' -> 'http'; None for what is not aiwfd."""
    parts = module.split(".")
    if parts[0] != "aiwfd":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, only for type checking) for every aiwfd import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            # `from aiwfd import x` imports the module aiwfd.x when x is one.
            mods = [n for n in names if (PACKAGE / Path(*n.split(".")[1:])).with_suffix(".py").exists()
                    or (PACKAGE / Path(*n.split(".")[1:])).is_dir()] or [node.module]
            found += [(m, id(node) in typing_only) for m in mods]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in typing_only) for a in node.names]
    return [(m, t) for m, t in found if m.startswith("aiwfd")]


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts)


def test_every_module_has_a_layer() -> None:
    for path in modules():
        assert layer_of(module_name(path)) in LAYERS, f"{path}: no layer in LAYERS (docs/architecture.md)"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path: Path) -> None:
    own = layer_of(module_name(path))
    assert own is not None
    for target, typing_only in imports(path):
        other = layer_of(target)
        if other in (None, "testing"):
            assert other != "testing", f"{path} imports {target}: aiwfd.testing is for tests only"
            continue
        assert other in LAYERS, target
        if typing_only and other == own:
            continue
        assert LAYERS[other] <= LAYERS[own], (
            f"{path.relative_to(REPO)} ({own}) imports {target} ({other}), a layer above it")


def test_providers_and_http_never_import_the_layers_above() -> None:
    """The issue's explicit rules, spelled out (the table above implies them)."""
    for path in modules():
        own = layer_of(module_name(path))
        for target, _ in imports(path):
            if own == "providers":
                assert layer_of(target) not in ("http", "daemon", "engine", "cli"), (path, target)
            if own == "http":
                assert layer_of(target) not in ("daemon", "cli"), (path, target)


def test_nothing_imports_tests() -> None:
    for path in [*PACKAGE.rglob("*.py"), *(REPO / "scripts").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert name != "tests" and not name.startswith("tests."), f"{path} imports {name}"


def test_spec_leaves_aiohttp_and_openai_out() -> None:
    """`aiwfd.spec` (what `aiwfd validate` needs) is pure: no web framework, no SDK."""
    code = ("import sys, aiwfd.spec.compiler, aiwfd.spec.openapi, aiwfd.spec.artifacts; "
            "print(' '.join(m for m in ('aiohttp', 'openai', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "", f"aiwfd.spec imported: {out.stdout}"


def test_the_daemon_loads_redis_and_pyjwt_only_when_configured() -> None:
    """Both are imported only where REDIS_URL or auth.jwt asks for them: every other
    start pays for neither (PyJWT alone is ~25 ms of imports)."""
    code = ("import sys, aiwfd.cli, aiwfd.daemon.server, aiwfd.http.app; "
            "print(sorted(m for m in ('redis', 'jwt', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
