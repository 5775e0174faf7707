"""What a new user meets in the first hour: one-line errors, validated operations, a clean stop, honest logs."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fake_segment import APP, FakeSegment, ingest_events, lifecycle, settings_for
from fastapi.testclient import TestClient
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from typer.testing import CliRunner

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.http import create_app
from subledger.app.wording import plural, validation_reason
from subledger.core.errors import ConfigError

SUBLEDGER = str(Path(sys.executable).parent / "subledger")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(tmp_path / "data"), **extra}
    env.pop("SUBLEDGER_CONFIG", None)
    return env


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(body)
    return path


# -- configuration errors -----------------------------------------------------------------------


def test_config_file_problems_are_one_line_naming_the_file(tmp_path: Path, db_url: str) -> None:
    runner = CliRunner()
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'api_token = "caf\xe9"\n')
    cases = {
        str(tmp_path): "is a directory",
        str(not_utf8): "is not UTF-8",
        str(tmp_path / "missing.toml"): "not found",
    }
    for path, reason in cases.items():
        result = runner.invoke(cli, ["outbox", "list", "--config", path, "--database-url", db_url])
        assert result.exit_code == 2, (path, result.output, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: config file {path}: "), lines
        assert reason in lines[0] and "config config" not in lines[0]
        assert not isinstance(result.exception, (OSError, UnicodeError)), result.exception


@pytest.mark.parametrize(("toml", "key", "reason"), [
    ('[apps.x.destinations.s]\nwrite_key = "k"\nrevenue_mode = "net"\n', "apps.x.destinations.s.revenue_mode",
     "must be one of: gross, after_commission, after_commission_and_tax"),
    ("[apps.x.destinations.s]\ngzip = true\n", "apps.x.destinations.s.write_key", "is required"),
    ("[apps.x]\ncolour = 1\n", "apps.x.colour", "unknown key"),
    ('max_body_bytes = "lots"\n', "max_body_bytes", "must be an integer"),
    ("[apps.x]\nsettle_delay_seconds = -1\n", "apps.x.settle_delay_seconds", "must be at least 0"),
    ('[apps.x.destinations.s]\nwrite_key = "k"\nevent_names = { nope = "x" }\n',
     "apps.x.destinations.s.event_names.nope", "is not a valid key; must be one of: initial_purchase"),
])
def test_config_errors_are_in_plain_words(tmp_path: Path, toml: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_module.load(_config(tmp_path, toml))
    assert raised.value.key == key
    assert raised.value.reason.startswith(reason), raised.value.reason
    for leaked in ("Input should", "Field required", "Extra inputs", "[key]"):
        assert leaked not in str(raised.value)


def test_validation_reason_covers_pydantic_wording() -> None:
    assert validation_reason({"type": "literal_error", "msg": "Input should be 'a' or 'b'",
                              "ctx": {"expected": "'a' or 'b'"}}) == "must be one of: a, b"
    assert validation_reason({"type": "value_error", "msg": "Value error, must be USD"}) == "must be USD"
    assert validation_reason({"type": "something_new", "msg": "Input should be a valid integer, unable"}) \
        == "must be an integer"


def test_plural() -> None:
    assert [plural(0, "row"), plural(1, "row"), plural(2, "entry"), plural(1200, "request")] == \
        ["0 rows", "1 row", "2 entries", "1,200 requests"]
    assert plural(1, "log entry", "log entries") == "1 log entry"


# -- usage errors, --version, the console script ------------------------------------------------


def test_console_script_usage_errors_are_one_line(tmp_path: Path, db_url: str) -> None:
    env = _env(tmp_path)
    runs = {
        ("serve", "--port", "99999"): "error: --port: must be between 0 and 65535, got 99999",
        ("serve", "--port", "eighty"): "error: --port: must be an integer",
        ("audit", "events", "--source", "nope", "--database-url", db_url):
            "error: --source: 'nope' is not allowed; must be one of: custom, apple, google, stripe",
    }
    for args, expected in runs.items():
        done = subprocess.run([SUBLEDGER, *args], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(expected), (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    version = subprocess.run([SUBLEDGER, "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("subledger ")


def test_version_option() -> None:
    from subledger.app.settings import package_version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"subledger {package_version()}"


# -- pause / resume only what exists; enum filters --------------------------------------------


def _paused_rows(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT app_id, destination FROM destination_state ORDER BY 1, 2").fetchall()


def test_pause_and_resume_refuse_unknown_apps_and_destinations(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, f'[apps."{APP}".destinations.segment]\nwrite_key = "k"\n')
    base = ["--config", str(config), "--database-url", db_url]
    runner = CliRunner()
    for args, hint in (
        (["outbox", "pause", "com.nope", "--destination", "segment"], "app 'com.nope' has no destinations"),
        (["outbox", "pause", APP, "--destination", "nope"], f"app '{APP}' has no destination 'nope'"),
        (["outbox", "resume", "com.nope"], "app 'com.nope' has no destinations"),
        (["outbox", "resume", APP, "--destination", "nope"], "its destinations: segment"),
    ):
        result = runner.invoke(cli, [*args, *base])
        assert result.exit_code == 2, result.output
        assert hint in result.stderr, result.stderr
    assert _paused_rows(db_url) == []
    ok = runner.invoke(cli, ["outbox", "pause", APP, "--destination", "segment", *base])
    assert ok.exit_code == 0 and f"paused {APP}/segment" in ok.stdout
    assert _paused_rows(db_url) == [(APP, "segment")]

    settings = settings_module.from_dict({"api_token": TOKEN, "apps": {APP: {"destinations": {
        "segment": {"write_key": "k"}}}}})
    with TestClient(create_app(build(settings, database_url=db_url))) as client:
        for path, params in ((f"/v1/outbox/pause/{APP}", {"destination": "nope"}),
                             ("/v1/outbox/pause/com.nope", {}),
                             ("/v1/outbox/resume/com.nope", {}),
                             (f"/v1/outbox/resume/{APP}", {"destination": "nope"})):
            answer = client.post(path, params=params, headers=AUTH)
            assert answer.status_code == 404, (path, answer.text)
            assert "no destination" in answer.json()["error"]
        assert client.get("/readyz").json()["paused_destinations"][0]["destination"] == "segment"
        resumed = client.post(f"/v1/outbox/resume/{APP}", params={"destination": "segment"}, headers=AUTH)
        assert resumed.status_code == 200 and resumed.json()["resumed"] == [{"app_id": APP, "destination": "segment"}]
    assert _paused_rows(db_url) == [(APP, "segment")]  # the row stays, no longer paused
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM destination_state WHERE paused").fetchone() == (0,)


def test_audit_events_enum_filters_list_the_allowed_values(db_url: str) -> None:
    runner = CliRunner()
    for option, value, allowed in (("--source", "nope", "apple"), ("--type", "renewel", "renewal"),
                                   ("--environment", "prod", "production")):
        result = runner.invoke(cli, ["audit", "events", option, value, "--database-url", db_url])
        assert result.exit_code == 2, result.output
        assert allowed in result.output and value in result.output
    settings = settings_module.from_dict({"api_token": TOKEN})
    with TestClient(create_app(build(settings, database_url=db_url))) as client:
        for name, value, allowed in (("source", "nope", "apple"), ("type", "renewel", "renewal"),
                                     ("environment", "prod", "sandbox")):
            answer = client.get("/v1/audit/events", params={name: value}, headers=AUTH)
            assert answer.status_code == 422, answer.text
            body = answer.json()
            assert body["field"] == name and allowed in body["error"] and "must be one of" in body["error"]
        fine = client.get("/v1/audit/events", params={"source": "apple", "environment": "sandbox"}, headers=AUTH)
        assert fine.status_code == 200 and fine.text == ""
        bad_status = client.get("/v1/outbox", params={"status": "gone"}, headers=AUTH)
        assert bad_status.status_code == 422
        assert bad_status.json()["error"] == "status: must be one of: pending, dead"


# -- serve: summary, JSON logs (uvicorn's too), exit 0 on SIGTERM --------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_until_healthy(tmp_path: Path, url: str, *args: str) -> tuple[int, str]:
    """Start `subledger serve` (JSON logs), wait for /healthz, SIGTERM it; its exit code and stderr."""
    port = _free_port()
    env = _env(tmp_path, SUBLEDGER_LOG_FORMAT="json")
    env.pop("SUBLEDGER_API_TOKEN", None)
    proc = subprocess.Popen([SUBLEDGER, "serve", "--port", str(port), "--database-url", url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve never answered"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    return proc.returncode, err


def test_serve_logs_its_migration_in_json_too(tmp_path: Path, pg_server: str) -> None:
    """A serve that migrates an empty database says so in the same JSON lines as everything else."""
    import uuid

    from subledger.store.db import with_database

    name = f"sl_fresh_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        code, err = _serve_until_healthy(tmp_path, with_database(pg_server, name), "--migrate", "--no-scheduler")
        assert code == 0, err
        lines = [json.loads(line) for line in err.strip().splitlines()]  # a plain line fails here
        assert any(line["message"].startswith("database schema migrated from revision none") for line in lines)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_serve_summarizes_logs_json_and_exits_0_on_sigterm(tmp_path: Path, db_url: str) -> None:
    secret = "s3cret-pw"
    url = make_conninfo(db_url, password=secret)
    code, err = _serve_until_healthy(tmp_path, url)
    assert code == 0, err
    lines = [json.loads(line) for line in err.strip().splitlines()]  # every line is JSON, uvicorn's too
    messages = [line["message"] for line in lines]
    text = "\n".join(messages)
    assert any(line["logger"].startswith("uvicorn") for line in lines), messages
    assert secret not in err and ":***@" in text
    dbname = conninfo_to_dict(db_url)["dbname"]
    assert any(m.startswith("database: postgresql://") and dbname in m for m in messages), messages
    assert "config: none" in text and "relay on" in text
    warnings = [line["message"] for line in lines if line["level"] == "warning"]
    assert any("no api_token" in w for w in warnings)
    assert any("no configuration file" in w for w in warnings)
    assert any("no destination is configured" in w for w in warnings)
    assert "maximum number of running instances" not in err


def test_summary_lists_apps_and_destinations(db_url: str) -> None:
    from subledger.app.startup import summarize

    settings = settings_module.from_dict({"api_token": "t", "apps": {APP: {"destinations": {
        "segment": {"write_key": "k", "endpoint": "http://127.0.0.1:9"}}}}})
    summary = summarize(build(settings, database_url=db_url), listen=None, relay=False, explicit_url=db_url)
    assert f"app {APP}: segment (http://127.0.0.1:9)" in summary.lines
    assert any("1 app, 1 destination; relay off" in line for line in summary.lines)
    assert not any("api_token" in w or "destination" in w for w in summary.warnings)


# -- relay logging --------------------------------------------------------------------------------


def test_a_draining_relay_logs_batches_not_skipped_runs(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """While a pass runs longer than the interval, APScheduler's skip warning stays out of the log."""
    from subledger.app.worker import build_relay, build_scheduler

    with FakeSegment() as fake:
        settings = settings_for(fake.url)
        made = ingest_events(db_url, settings, lifecycle(1) + lifecycle(2),
                             now=datetime.now(UTC) - timedelta(hours=1))
        services = build(settings, database_url=db_url)
        relay = build_relay(services)
        real_drain = relay.drain

        def slow_drain(stop: Any = None, max_passes: Any = None) -> Any:
            time.sleep(1.5)  # longer than the 0.2 s interval: the scheduler skips runs meanwhile
            return real_drain(stop, max_passes)

        relay.drain = slow_drain  # type: ignore[method-assign]
        jobs = build_scheduler(services, relay, interval=0.2, expirations=False)
        caplog.set_level(logging.INFO)
        jobs.start()
        try:
            deadline = time.monotonic() + 20
            while fake.capture.distinct() < 2 * made:
                assert time.monotonic() < deadline, "the relay did not deliver"
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            jobs.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("maximum number of running instances" in m for m in messages)
    batches = [r for r in caplog.records if r.getMessage().startswith("delivered a batch of")]
    assert batches and sum(int(r.getMessage().split()[4]) for r in batches) == made  # one row per transition
    assert all(getattr(r, "destination", None) == "segment" for r in batches)


def test_uvicorn_lines_use_the_json_formatter() -> None:
    import logging.config

    from subledger.app.logs import uvicorn_log_config

    logging.config.dictConfig(uvicorn_log_config("json"))
    stream = io.StringIO()
    handler = logging.getLogger("uvicorn").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:1")
    line = json.loads(stream.getvalue())
    assert line["message"] == "Uvicorn running on http://127.0.0.1:1" and line["logger"] == "uvicorn.error"


# -- progress bars --------------------------------------------------------------------------------


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=140)


def test_ingest_progress_counts_events_and_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from subledger.app.cli import ingest as cli_module

    console = _terminal()
    monkeypatch.setattr(cli_module, "err", console)
    data = tmp_path / "e.ndjson"
    data.write_bytes(b"x\n" * 3000)
    with data.open("rb") as stream:
        items = list(cli_module._with_progress(iter(range(3000)), stream, enabled=True))
    assert len(items) == 3000
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "events" in shown and "events/s" in shown
    assert "kB" not in shown and "bytes" not in shown
    plain = list(cli_module._with_progress(iter(range(5)), io.BytesIO(), enabled=False))
    assert plain == list(range(5))


def test_verify_shows_progress_on_a_terminal_only(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from subledger.app.cli import maintenance as cli_maintenance

    settings = settings_for("http://127.0.0.1:9")
    ingest_events(db_url, settings, lifecycle(1))
    console = _terminal()

    class TerminalSys:
        stderr = type("Tty", (), {"isatty": staticmethod(lambda: True)})()

    monkeypatch.setattr(cli_maintenance, "sys", TerminalSys)
    monkeypatch.setattr(cli_maintenance, "err", console)
    cli_maintenance.verify(as_json=False, config=None, database_url=db_url)
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "verifying chain" in shown and "log entries" in shown and "subscriptions" in shown
    monkeypatch.undo()
    piped = CliRunner().invoke(cli, ["verify", "--database-url", db_url])
    assert piped.exit_code == 0 and "verifying" not in piped.output
    assert piped.stdout.startswith("ok: 6 log entries chain correctly; 1 subscription equals")


# -- outbox list counts, the demo's last lines -------------------------------------------------


def test_outbox_list_counts_in_words(tmp_path: Path, db_url: str) -> None:
    settings = settings_for("http://127.0.0.1:9")
    ingest_events(db_url, settings, lifecycle(1)[:2], now=datetime.now(UTC) - timedelta(hours=1))
    result = CliRunner().invoke(cli, ["outbox", "list", "--database-url", db_url])
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == "2 rows"
    one = CliRunner().invoke(cli, ["outbox", "list", "--limit", "1", "--database-url", db_url])
    assert one.stdout.strip().splitlines()[-1] == "1 row"


def test_demo_ends_with_its_database_and_what_to_try(monkeypatch: pytest.MonkeyPatch) -> None:
    from subledger.app.demo import print_next_steps

    monkeypatch.delenv("SUBLEDGER_DATABASE_URL", raising=False)
    console = Console(file=io.StringIO(), width=80)
    print_next_steps(console, "host=/tmp/sock dbname=subledger_demo user=postgres password=pw")
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0] == "demo database postgresql://postgres:***@/subledger_demo?host=/tmp/sock (password masked)"
    commands = [line.strip() for line in lines if line.strip().startswith("subledger ")]
    assert len(commands) == 2 and all("--database-url 'postgresql://" in c for c in commands)
    assert "subledger db stop" in lines[-1]


# -- packaging ------------------------------------------------------------------------------------


def test_metadata_builds_without_setuptools_warnings(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
         "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "deprecated" not in done.stderr, done.stderr
    metadata = next(tmp_path.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in metadata.read_text()


# -- the embedded PostgreSQL: db status / db stop ----------------------------------------------


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private SUBLEDGER_DATA_DIR (never ./.subledger); whatever runs there is stopped afterwards."""
    from subledger.store import embedded

    directory = Path(tempfile.mkdtemp(prefix="sl-ops-"))
    monkeypatch.setenv("SUBLEDGER_DATA_DIR", str(directory))
    monkeypatch.delenv("SUBLEDGER_DATABASE_URL", raising=False)
    try:
        yield directory
    finally:
        embedded.stop(directory)
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_db_status_and_stop_the_embedded_server(data_dir: Path) -> None:
    from subledger.store.db import embedded_url

    runner = CliRunner()
    before = runner.invoke(cli, ["db", "status", "--json"])
    assert before.exit_code == 0 and json.loads(before.stdout)["running"] is False
    url = embedded_url(data_dir)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    shown = runner.invoke(cli, ["db", "status"])
    assert shown.exit_code == 0
    assert "embedded PostgreSQL: running" in shown.stdout and str(data_dir / "pgdata") in shown.stdout
    assert "url: postgresql://" in shown.stdout
    status = json.loads(runner.invoke(cli, ["db", "status", "--json"]).stdout)
    assert status["running"] is True and status["data_dir"] == str(data_dir)
    with psycopg.connect(status["url"]) as conn:  # the URL shown is one that connects
        assert conn.execute("SELECT 1").fetchone() == (1,)
    stopped = runner.invoke(cli, ["db", "stop"])
    assert stopped.exit_code == 0 and "stopped the embedded PostgreSQL" in stopped.stdout
    assert json.loads(runner.invoke(cli, ["db", "status", "--json"]).stdout)["running"] is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
    again = runner.invoke(cli, ["db", "stop"])
    assert again.exit_code == 0 and "is not running" in again.stdout


def test_a_range_error_of_an_option_with_a_short_name_reads_plainly() -> None:
    """click names such an option "'--jobs' / '-j'"; the rewrite once left "must be one of: " and nothing."""
    from subledger.app.wording import plain

    assert plain("Invalid value for '--jobs' / '-j': Input should be greater than or equal to 1") == (
        "--jobs: must be greater than or equal to 1")
