"""The dependency direction (product.md, style.md): app → scheduler → outbox → store → core.

`core` imports none of the other layers and no I/O library, and reads no clock; `store` imports
neither `outbox` nor `app`; nothing but `app` imports `app`; and no module of the project imports
itself back through others (no import cycle, inside a layer as much as across); and no SQL text
outside `store/` (and `migrations/`). Checked on the
source with `ast`, so a lazy import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
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
        elif (dynamic := dynamic_import(node)) is not None:
            yield node.lineno, dynamic


def dynamic_import(node: ast.AST) -> str | None:
    """The module of `importlib.import_module("x")` / `__import__("x")` with a literal name, else None."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


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


# -- no import cycles -----------------------------------------------------------------------------

FOLDERS = (*LAYERS, "migrations")


def module_of(path: Path) -> str:
    """The installed name of a source file: app/cli/__init__.py → subledger.app.cli."""
    package = package_of(path)
    return package if path.name == "__init__.py" else f"{package}.{path.stem}"


def project_modules() -> dict[str, Path]:
    return {module_of(path): path for folder in FOLDERS for path in sources(folder)}


def project_imports(source: str, module: str, package: str, known: Iterable[str]) -> Iterator[tuple[int, str]]:
    """The project modules a source imports (top level or inside a function), as (line, module).

    `from pkg import name` is an import of `pkg.name` when that is a module, else of `pkg`; a name
    is resolved to the longest known module it starts with. A module's own package is not an edge:
    Python runs a package's `__init__` before any of its modules, which is no dependency of theirs.
    """
    names = set(known)
    own = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)}

    def longest(name: str) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in names:
                return ".".join(parts[:n])
        return None

    here = package.split(".")
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                parent = ".".join([*base, node.module] if node.module else base)
            else:
                parent = node.module or ""
            targets = [f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in names else parent
                       for alias in node.names]
        elif (dynamic := dynamic_import(node)) is not None:
            targets = [dynamic]
        for target in targets:
            found = longest(target)
            if found is not None and found != module and found not in own:
                yield node.lineno, found


def import_graph(files: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, int]]:
    """module → {imported module: first line}, from {module: (source, package)}."""
    graph: dict[str, dict[str, int]] = {}
    for module, (source, package) in files.items():
        edges = graph.setdefault(module, {})
        for line, target in project_imports(source, module, package, files):
            edges.setdefault(target, line)
    return graph


def cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each as the
    list of modules around it, starting from the smallest name; [] when the graph has none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(start: str) -> None:  # iterative: a deep import chain must not hit the recursion limit
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    found = []
    for component in components:
        first = min(component)
        # the shortest way back to `first` inside the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [first]
        while frontier and first not in previous:
            following = []
            for node in frontier:
                for child in sorted(graph.get(node, {})):
                    if child in component and child not in previous:
                        previous[child] = node
                        following.append(child)
            frontier = following
        path = [first]
        node = previous[first]
        while node != first:
            path.append(node)
            node = previous[node]
        found.append([first, *reversed(path[1:])])
    return sorted(found)


def describe(cycle: list[str], graph: Mapping[str, Mapping[str, int]], paths: Mapping[str, Path]) -> str:
    """`a (a.py:3) → b (b.py:9) → a`: each step names the file and line of the import."""
    steps = []
    for here, there in zip(cycle, [*cycle[1:], cycle[0]], strict=True):
        where = paths[here].relative_to(ROOT) if here in paths else here
        steps.append(f"{here} ({where}:{graph[here][there]} imports {there})")
    return " → ".join(steps)


def test_no_import_cycles() -> None:
    """Among all the project's modules, module-level and function-level imports alike; a cycle
    is reported with every import that closes it, so the fix is where the message points."""
    paths = project_modules()
    files = {module: (path.read_text(encoding="utf-8"), package_of(path)) for module, path in paths.items()}
    graph = import_graph(files)
    assert [describe(cycle, graph, paths) for cycle in cycles(graph)] == []


# A statement's opening words (or a server function call); docstrings may name SQL, code may not.
SQL_TEXT = re.compile(
    r"\b(?:SELECT\s|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(?:TABLE|INDEX|FUNCTION)"
    r"|ALTER\s+TABLE|TRUNCATE\s|COPY\s+\w+|(?:NOTIFY|LISTEN)\s+[a-z_]+\s*(?:[,;]|$)|pg_[a-z_]+\()",
    re.MULTILINE,
)


def sql_strings(code: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant that reads as SQL, docstrings excepted."""
    tree = ast.parse(code)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings and SQL_TEXT.search(node.value)
    ]


@pytest.mark.parametrize("layer", ["core", "outbox", "scheduler", "app"])
def test_sql_lives_in_store(layer: str) -> None:
    """Every statement has one home in `store/` (and `migrations/`): a table's writers are found there."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text.strip()[:60]!r}"
        for path in sources(layer)
        for line, text in sql_strings(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_the_sql_checker_sees_statements_not_prose() -> None:
    code = (
        '"""Claims rows with SELECT ... FOR UPDATE SKIP LOCKED."""\n'
        'Q = "SELECT 1 FROM outbox"\n'
        'def f(t):\n'
        '    """DELETE FROM is named here only."""\n'
        '    return f"UPDATE outbox SET status = {t}", "NOTIFY subledger_outbox", "NOTIFY wakes it sooner"\n'
    )
    assert [line for line, _ in sql_strings(code)] == [2, 5, 5]
    assert sql_strings((ROOT / "store" / "log.py").read_text(encoding="utf-8"))  # the home does hold SQL


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


def test_the_cycle_checker_finds_and_reports_a_cycle() -> None:
    files = {
        "subledger.app.cli": ("from subledger.app.cli import audit\n", "subledger.app.cli"),
        "subledger.app.cli.audit": ("from subledger.app.cli import common\n", "subledger.app.cli"),
        "subledger.app.cli.common": ("def f():\n    from subledger.app.cli.outbox import x\n", "subledger.app.cli"),
        "subledger.app.cli.outbox": ("from .audit import connection\nimport subledger.app.cli\n", "subledger.app.cli"),
        "subledger.app.http": ("from subledger.app.http import docs\n", "subledger.app.http"),
        "subledger.app.http.docs": ("from subledger.app.http import common\n", "subledger.app.http"),
        "subledger.app.http.common": ("import json\nfrom subledger.store.db import connect\n", "subledger.app.http"),
        "subledger.store.db": ("import importlib\nimportlib.import_module('subledger.store.db')\n", "subledger.store"),
    }
    graph = import_graph(files)
    # `from pkg import module` names the module, not the package; a module's own package is no edge
    assert graph["subledger.app.http"] == {"subledger.app.http.docs": 1}
    assert graph["subledger.app.http.docs"] == {"subledger.app.http.common": 1}
    assert graph["subledger.app.cli.outbox"] == {"subledger.app.cli.audit": 1}  # relative; own package dropped
    assert graph["subledger.app.cli.common"] == {"subledger.app.cli.outbox": 2}  # inside a function counts
    assert graph["subledger.store.db"] == {}  # itself: no edge
    found = cycles(graph)
    assert found == [["subledger.app.cli.audit", "subledger.app.cli.common", "subledger.app.cli.outbox"]]
    paths = {m: ROOT / "app" / "x.py" for m in files}
    assert describe(found[0], graph, paths) == (
        "subledger.app.cli.audit (app/x.py:1 imports subledger.app.cli.common) → "
        "subledger.app.cli.common (app/x.py:2 imports subledger.app.cli.outbox) → "
        "subledger.app.cli.outbox (app/x.py:1 imports subledger.app.cli.audit)"
    )
    graph["subledger.app.cli.common"] = {}
    assert cycles(graph) == []
    assert len(project_modules()) > 50 and "subledger.app.cli" in project_modules()  # the walk finds them
