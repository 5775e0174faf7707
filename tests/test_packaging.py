"""The distribution installs everything under `subledger.*` and nothing under a bare top-level name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_subledger_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("subledger-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert all(t == "subledger" or t.endswith(".dist-info") for t in tops), tops
    for required in (
        "subledger/core/lifecycle.py",
        "subledger/store/log.py",
        "subledger/outbox/ingest.py",
        "subledger/app/cli/__init__.py",
        "subledger/app/http/__init__.py",
        "subledger/app/console/templates/subscriber.html",
        "subledger/app/console/static/console.css",
        "subledger/store/models.py",
        "subledger/migrations/env.py",
        "subledger/migrations/alembic.ini",
        "subledger/migrations/versions/0001_ledger.py",
        "subledger/app/samples/canonical_lifecycle.ndjson",
    ):
        assert required in names, required
    assert not any(n.startswith(("core/", "store/", "outbox/", "app/", "tests/")) for n in names)


def test_console_script_answers_help() -> None:
    script = Path(sys.executable).with_name("subledger")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("demo", "ingest", "serve", "db"):
        assert command in result.stdout


# Declared, never imported: each is run as a tool, or loaded by one.
TOOLS = {
    "ruff": "make lint",
    "mypy": "make lint",
    "pytest-timeout": "a pytest plugin: the `timeout` option of [tool.pytest.ini_options]",
    "setuptools": "the build backend; tests/test_packaging.py builds the wheel without isolation",
    "wheel": "the same wheel build",
}
# Where the code is: the five layers, the migrations, the tests and the bench (.ci/run is bash and stdlib).
CODE = ("core", "store", "outbox", "scheduler", "app", "migrations", "tests", "bench")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # every extra counts: `bench` (the optional peer in bench/peer.py) as much as `dev`
    specs = [*project["dependencies"], *(s for group in project["optional-dependencies"].values() for s in group)]
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", spec).group(0)) for spec in specs}  # type: ignore[union-attr]


def _imported_top_levels() -> set[str]:
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"subledger", "bench"}
    found: set[str] = set()
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - local - set(sys.stdlib_module_names)


def test_every_dependency_is_imported_and_every_import_declared() -> None:
    """pyproject.toml lists what the code imports: nothing unused, nothing borrowed from a dependency's dependency."""
    declared = _declared()
    providers = {module: {_canonical(d) for d in dists} for module, dists in packages_distributions().items()}
    modules = _imported_top_levels()
    undeclared = sorted(m for m in modules if not providers.get(m, {m}) & declared)
    # a module whose distribution is not installed here (an optional extra: bench's eventsourcing)
    # counts under its own name, as `undeclared` above reads it
    used = set().union(*(providers.get(m, {_canonical(m)}) for m in modules)) & declared
    assert undeclared == [], "imported but not declared in pyproject.toml"
    assert sorted(declared - used - set(TOOLS)) == [], "declared in pyproject.toml but never imported"
    assert set(TOOLS) <= declared
