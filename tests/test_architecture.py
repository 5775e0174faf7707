"""The dependency direction (product.md, style.md): app → scheduler → outbox → store → core.

`core` imports none of the other layers and no I/O library, and reads no clock; `store` imports
neither `outbox` nor `app`; nothing but `app` imports `app`. Checked on the source with `ast`, so a
lazy import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "store", "outbox", "scheduler", "app")

# third-party packages that mean a database, the network or a framework: none belongs in core
IO_LIBRARIES = {
    "psycopg",
    "psycopg2",
    "psycopg_pool",
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "pgserver",
    "httpx",
    "requests",
    "urllib3",
    "aiohttp",
    "fastapi",
    "starlette",
    "uvicorn",
    "apscheduler",
    "typer",
    "click",
    "prometheus_client",
    "testcontainers",
}

FORBIDDEN: dict[str, set[str]] = {
    "core": {"subledger.store", "subledger.outbox", "subledger.scheduler", "subledger.app",
             "subledger.migrations", *IO_LIBRARIES},
    "store": {"subledger.outbox", "subledger.scheduler", "subledger.app"},
    "outbox": {"subledger.scheduler", "subledger.app"},
    "scheduler": {"subledger.app"},
    "app": set(),
}


def sources(layer: str) -> list[Path]:
    return sorted(p for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def package_of(path: Path) -> str:
    """The package a source file lives in, as installed: core/sources/x.py → subledger.core.sources."""
    return ".".join(("subledger", *path.relative_to(ROOT).parts[:-1]))


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    return modules_in(path.read_text(encoding="utf-8"), package_of(path))


def modules_in(source: str, package: str) -> Iterator[tuple[int, str]]:
    """Every module a source imports, relative imports resolved, `importlib.import_module("x")` included."""
    tree = ast.parse(source)
    here = package.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from subledger import app` imports subledger.app
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def violates(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


def violations(layer: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources(layer)
        for line, module in imported_modules(path)
        if violates(module, forbidden)
    ]


@pytest.mark.parametrize("layer", LAYERS)
def test_dependency_direction(layer: str) -> None:
    assert violations(layer, FORBIDDEN[layer]) == []


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer != "app"])
def test_nothing_but_app_imports_app(layer: str) -> None:
    assert violations(layer, {"subledger.app"}) == []


def test_nothing_imports_the_bare_folder_names() -> None:
    """The folders install under `subledger.` only; `import core` would work in a checkout and nowhere else."""
    bare = set(LAYERS) | {"migrations"}
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for layer in LAYERS
        for path in sources(layer)
        for line, module in imported_modules(path)
        if module.split(".")[0] in bare
    ]
    assert found == []


CLOCK_TEXT = ("datetime.now(", "time.time(", "utcnow(", "date.today(", "time.monotonic(", "perf_counter(")
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "time_ns"}
CLOCK_OWNERS = {"datetime", "date", "time"}


def test_core_reads_no_clock() -> None:
    """Rule 7: `now` is an argument. Neither the text nor a call through an alias reads the clock."""
    found = []
    for path in sources("core"):
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {needle}" for needle in CLOCK_TEXT if needle in text]
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_CALLS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in CLOCK_OWNERS
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {node.func.value.id}.{node.func.attr}()")
            if isinstance(node, ast.ImportFrom) and node.module == "time":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports from time")
    assert found == []


def test_core_does_no_io() -> None:
    """No sockets, subprocesses, environment or files read from core: adapters get bytes, not paths."""
    io_modules = {"socket", "subprocess", "urllib.request", "http.client", "ssl", "asyncio", "threading"}
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources("core")
        for line, module in imported_modules(path)
        if violates(module, io_modules)
    ]
    text_hits = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in sources("core")
        for needle in ("open(", "os.environ", "getenv(")
        if re.search(rf"(?<![\w.]){re.escape(needle)}", path.read_text(encoding="utf-8"))
    ]
    assert found + text_hits == []


# -- the checker itself, on snippets, so that a silent pass means something ---------------------------


def test_the_checker_sees_relative_lazy_and_dynamic_imports() -> None:
    code = (
        "import importlib\n"
        "from ..lifecycle import fold\n"
        "from . import apple\n"
        "def f():\n"
        "    from subledger import store\n"
        "    import psycopg.rows\n"
        "    return importlib.import_module('subledger.outbox.writer')\n"
    )
    found = {module for _, module in modules_in(code, "subledger.core.sources")}
    assert {"subledger.core.lifecycle", "subledger.core.sources.apple", "subledger.store", "psycopg.rows",
            "subledger.outbox.writer"} <= found
    assert [m for m in sorted(found) if violates(m, FORBIDDEN["core"])] == [
        "psycopg.rows", "subledger.outbox.writer", "subledger.store",
    ]
    assert package_of(ROOT / "core" / "__init__.py") == "subledger.core"
    assert package_of(ROOT / "core" / "sources" / "apple.py") == "subledger.core.sources"
    assert sources("core")  # the walk finds the files it is meant to guard
