"""The distribution installs everything under `subledger.*` and nothing under a bare top-level name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
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
        "subledger/app/cli.py",
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
