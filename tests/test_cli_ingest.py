"""`subledger ingest`: streams NDJSON or arrays, names file and line of each rejection, exits non-zero."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

APP = "com.example"


def run(args: list[str], db_url: str, config: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "subledger.app", *args, "--config", str(config), "--database-url", db_url]
    return subprocess.run(cmd, input=stdin.decode() if stdin else None, capture_output=True, text=True, timeout=120)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "subledger.toml"
    path.write_text(f'[apps."{APP}".destinations.segment]\nwrite_key = "${{TEST_WRITE_KEY}}"\n')
    return path


@pytest.fixture(autouse=True)
def _write_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WRITE_KEY", "secret")


def recent() -> str:
    """Two hours before the CLI's own clock (the real one): inside the 72 h historical horizon."""
    return (datetime.now(UTC) - timedelta(hours=2)).isoformat()


def ev(i: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"e{i}", "app_id": APP, "type": "purchase", "occurred_at": recent(),
            "subscription_id": f"s{i}", "product_id": "p", **extra}


def count(db_url: str, table: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert row is not None
        return int(row[0])


def test_ndjson_with_bad_lines(tmp_path: Path, db_url: str, config: Path) -> None:
    lines = [json.dumps(ev(1)), "{not json", json.dumps(ev(2, type="nope")), "", json.dumps(ev(3)),
             json.dumps(ev(1))]
    file = tmp_path / "events.ndjson"
    file.write_text("\n".join(lines) + "\n")
    result = run(["ingest", str(file), "--json"], db_url, config)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["new"], summary["duplicate"], summary["rejected"]) == (2, 1, 2)
    assert summary["rejections"][0].startswith(f"{file}:2: malformed JSON")
    assert summary["rejections"][1].startswith(f"{file}:3: type: unknown value 'nope'")
    assert count(db_url, "event_log") == 2


def test_json_array_from_stdin_all_good(db_url: str, config: Path) -> None:
    body = json.dumps([ev(i) for i in range(5)], indent=2).encode()
    result = run(["ingest", "-"], db_url, config, stdin=body)
    assert result.returncode == 0, result.stderr
    assert "new 5, duplicate 0, rejected 0, transitions 5" in result.stdout
    assert count(db_url, "outbox") == 5


def test_historical_flag_records_without_publishing(tmp_path: Path, db_url: str, config: Path) -> None:
    file = tmp_path / "h.ndjson"
    file.write_text("".join(json.dumps(ev(i)) + "\n" for i in range(3)))
    result = run(["ingest", str(file), "--historical"], db_url, config)
    assert result.returncode == 0, result.stderr
    assert count(db_url, "transitions") == 3
    assert count(db_url, "outbox") == 0


def test_missing_file_and_bad_config_are_one_line_errors(tmp_path: Path, db_url: str, config: Path) -> None:
    missing = run(["ingest", str(tmp_path / "nope.ndjson")], db_url, config)
    assert missing.returncode == 2
    assert "nope.ndjson" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[apps."{APP}".destinations.segment]\nwrite_key = "k"\nrevenue_mode = "net"\n')
    result = run(["ingest", str(tmp_path / "x")], db_url, bad)
    assert result.returncode == 2
    assert f'apps."{APP}".destinations.segment.revenue_mode' in result.stderr
    assert "Traceback" not in result.stderr


def test_unset_secret_names_the_key(tmp_path: Path, db_url: str, config: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_WRITE_KEY")
    result = run(["ingest", str(tmp_path / "x")], db_url, config)
    assert result.returncode == 2
    assert "write_key" in result.stderr and "TEST_WRITE_KEY" in result.stderr


def test_db_upgrade_and_help(db_url: str, config: Path) -> None:
    result = run(["db", "upgrade"], db_url, config)
    assert result.returncode == 0, result.stderr
    assert "0001" in result.stdout or "revision" in result.stdout
    helped = subprocess.run([sys.executable, "-m", "subledger.app", "ingest", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--historical" in helped.stdout


def test_jobs_import_records_arrival_import_and_verifies(tmp_path: Path, db_url: str, config: Path) -> None:
    """`--jobs 2`: the parallel import; every entry arrives as `import` (hashed), and the chain verifies."""
    file = tmp_path / "many.ndjson"
    file.write_text("".join(json.dumps(ev(i)) + "\n" for i in range(60)) + "{broken\n")
    result = run(["ingest", str(file), "--jobs", "2", "--json"], db_url, config)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["new"], summary["rejected"], summary["transitions"]) == (60, 1, 60)
    assert summary["rejections"][0].startswith(f"{file}:61: malformed JSON")
    with psycopg.connect(db_url) as conn:
        arrivals = conn.execute("SELECT arrival, count(*) FROM event_log GROUP BY 1").fetchall()
    assert arrivals == [("import", 60)]
    verified = run(["verify"], db_url, config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    again = run(["ingest", str(file), "--jobs", "2", "--json"], db_url, config)
    assert json.loads(again.stdout)["duplicate"] == 60
    bad = run(["ingest", str(file), "--jobs", "0"], db_url, config)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
