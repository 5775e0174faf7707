"""Database faults: an outage is a bounded 503 with Retry-After on every route, never a 500 or a
driver message; the service recovers by itself within seconds of the database returning; commands
facing an unreachable or never-migrated database print one line naming the problem and the fix.

The outage test runs its own PostgreSQL (pgserver's bundled binaries: nothing but the Python
package is needed), which it stops and starts under load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import psycopg.sql
import pytest
from fastapi.testclient import TestClient
from live_server import Served, free_port
from test_source_revenuecat import rc_event
from typer.testing import CliRunner
from webhooks_support import RC_APP, config_dict, rc_body, rc_headers, write_root

from subledger.app import settings as settings_module
from subledger.app.bootstrap import build
from subledger.app.cli import app as cli
from subledger.app.http import create_app
from subledger.app.logs import JsonFormatter
from subledger.store import migrate
from subledger.store.db import with_database

TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class PrivatePostgres:
    """A throwaway PostgreSQL on 127.0.0.1 that a test may stop and start at will.

    Uses the binaries bundled with the `pgserver` package; as root it runs them as pgserver's
    own system user, as pgserver itself does (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.root = Path(tempfile.mkdtemp(prefix="sl-private-pg-"))
        self.pgdata = self.root / "pgdata"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            self.user = "pgserver"
            entry = ensure_user_exists(self.user)
            ensure_prefix_permissions(self.root)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "-U", "postgres", "--encoding=utf8",
                  "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        subprocess.run([str(self.bin / exe), *args], check=True, capture_output=True, timeout=60, user=self.user)

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=40"
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-o", options,
                  "-l", str(self.root / "log"), "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "30", "-m", "fast", "stop")

    def cleanup(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@dataclass
class Answer:
    at: float
    status: int  # 0: no HTTP answer at all
    seconds: float
    body: str
    retry_after: str | None


@dataclass
class Load:
    """Clients posting canonical events as fast as the service answers; every answer is kept."""

    base_url: str
    workers: int = 4
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(self.workers):
            thread = threading.Thread(target=self._work, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _work(self, n: int) -> None:
        with httpx.Client(base_url=self.base_url, headers=AUTH, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    reply = client.post("/v1/events", json=_event(f"load-{n}-{i}"))
                    answer = Answer(started, reply.status_code, time.monotonic() - started, reply.text,
                                    reply.headers.get("retry-after"))
                except httpx.HTTPError as exc:
                    answer = Answer(started, 0, time.monotonic() - started, repr(exc), None)
                self.answers.append(answer)
                time.sleep(0.02)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def since(self, t: float) -> list[Answer]:
        return [a for a in self.answers if a.at >= t]


def _event(event_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"id": event_id, "app_id": "com.faults.app", "type": "purchase", "subscription_id": event_id,
            "store": "app_store", "environment": "production", "app_user_id": f"u-{event_id}",
            "occurred_at": now.isoformat(), "expires_at": (now + timedelta(days=30)).isoformat(),
            "product_id": "monthly", "price": "9.99", "currency": "USD"}


class Service(Served):
    """The production app, configured for the fault tests, served by uvicorn in a thread."""

    def __init__(self, database_url: str, tmp_path: Path, timeout: float) -> None:
        data = config_dict(write_root(tmp_path))
        data["apps"]["com.faults.app"] = {}
        data.update(api_token=TOKEN, database_timeout_seconds=timeout)
        super().__init__(create_app(build(settings_module.from_dict(data), database_url=database_url)))


def _wait_for(load: Load, status: int, after: float, limit: float) -> float:
    """Seconds from `after` to the first answer with `status` that was asked at or after `after`."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = [a for a in load.since(after) if a.status == status]
        if found:
            return min(a.at + a.seconds for a in found) - after
        time.sleep(0.05)
    raise AssertionError(f"no {status} within {limit} s; got {sorted({a.status for a in load.since(after)})}")


def _routes_while_down(base_url: str) -> dict[str, tuple[int, float, httpx.Response]]:
    """One request to each database-backed route family."""
    raw = rc_body(rc_event("RENEWAL"))
    calls: dict[str, tuple[str, str, dict[str, Any]]] = {
        "events": ("POST", "/v1/events", {"json": _event("down-1"), "headers": AUTH}),
        "webhook": ("POST", f"/webhooks/revenuecat/{RC_APP}", {"content": raw, "headers": rc_headers()}),
        "timeline": ("GET", "/v1/audit/timeline/u-1", {"headers": AUTH}),
        "audit events (streamed)": ("GET", "/v1/audit/events", {"headers": AUTH}),
        "stats": ("GET", "/v1/audit/stats", {"headers": AUTH}),
        "outbox": ("GET", "/v1/outbox", {"headers": AUTH}),
        "outbox retry": ("POST", "/v1/outbox/dead/retry", {"headers": AUTH}),
        "outbox pause": ("POST", f"/v1/outbox/pause/{RC_APP}", {"headers": AUTH}),
        "links": ("GET", "/v1/subscribers/u-1/links", {"headers": AUTH}),
        "readyz": ("GET", "/readyz", {}),
    }
    found: dict[str, tuple[int, float, httpx.Response]] = {}

    def call(name: str, method: str, path: str, kwargs: dict[str, Any]) -> None:
        started = time.monotonic()
        reply = httpx.request(method, base_url + path, timeout=30, **kwargs)
        found[name] = (reply.status_code, time.monotonic() - started, reply)

    threads = [threading.Thread(target=call, args=(name, *spec)) for name, spec in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return found


@pytest.mark.slow
def test_outage_is_a_bounded_503_on_every_route_and_the_service_recovers_by_itself(
    private_pg: PrivatePostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(private_pg.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE faults")
    url = with_database(private_pg.url, "faults")
    migrate.upgrade(url)
    timeout = 2.0
    caplog.set_level(logging.WARNING, logger="subledger.http")
    with Service(url, tmp_path, timeout) as service:
        load = Load(service.url)
        load.start()
        try:
            _wait_for(load, 200, time.monotonic(), 10)

            # 1. a restart: the pooled connections all go stale at once
            private_pg.stop()
            private_pg.start()
            restarted = time.monotonic()
            first_200_after_restart = _wait_for(load, 200, restarted, 10)
            time.sleep(1.5)

            # 2. an outage longer than the pool's wait
            stopping = time.monotonic()
            private_pg.stop()
            down = time.monotonic()
            first_503 = _wait_for(load, 503, stopping, timeout + 5)
            routes = _routes_while_down(service.url)
            time.sleep(max(0.0, down + timeout + 1.5 - time.monotonic()))  # longer than the pool's wait
            private_pg.start()
            up = time.monotonic()
            first_200 = _wait_for(load, 200, up, 15)
            time.sleep(2.5)
        finally:
            load.join()

    answers = load.answers
    slowest_503 = max((a.seconds for a in answers if a.status == 503), default=0.0)
    print(f"\nDB restart: first 200 {first_200_after_restart:.2f} s after it was back; outage: first 503 "
          f"{first_503:.2f} s after the stop began, slowest 503 {slowest_503:.2f} s, first 200 {first_200:.2f} s "
          f"after it was back (database_timeout_seconds={timeout}; {len(answers)} answers)")
    assert answers, "the load produced no answers"
    assert {a.status for a in answers} <= {200, 503}, sorted({(a.status, a.body[:80]) for a in answers})
    for a in answers:
        if a.status == 503:
            assert a.retry_after is not None and a.retry_after.isdigit(), a
            assert a.seconds <= timeout + 1.5, f"a 503 took {a.seconds:.2f} s (timeout {timeout} s)"
            body = httpx.Response(503, content=a.body).json()
            assert body["error"] == "database unavailable" and set(body) == {"error", "error_id"}, body
    assert first_200_after_restart <= 2.0 and first_503 <= timeout + 1.5 and first_200 <= 3.0
    # once a restart is over, stale pooled connections cost no further 503 (checked before use)
    # (a request in flight when the database stops may fail: only those answered before the stop count)
    settled = [a for a in answers if (restarted + 1.5 <= a.at and a.at + a.seconds < stopping) or a.at >= up + 1.5]
    assert settled and all(a.status == 200 for a in settled), sorted({a.status for a in settled})

    for name, (status, seconds, reply) in routes.items():
        assert status == 503, (name, status, reply.text)
        assert seconds <= timeout + 1.5, (name, seconds)
        assert reply.headers.get("retry-after", "").isdigit(), name
        body = reply.json()
        assert body["error"] == "database unavailable" and body["error_id"], (name, body)
        assert not ({"psycopg", "connection", "127.0.0.1", "refused"} & set(reply.text.replace('"', " ").split()))
        # the detail is in the log, under the id the client was given
        assert any(body["error_id"] in r.getMessage() for r in caplog.records), name


@pytest.mark.edits_tables  # renames the outbox away
def test_a_database_error_is_a_503_with_an_id_and_no_sql_text(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox RENAME TO outbox_gone")  # every ingest now fails in SQL
        conn.execute("ALTER TABLE rollup_outbox RENAME TO rollup_outbox_gone")  # and /readyz's backlog read
    data = {**config_dict(write_root(tmp_path)), "api_token": TOKEN, "accept_unconfigured_apps": True}
    caplog.set_level(logging.WARNING, logger="subledger.http")
    with TestClient(create_app(build(settings_module.from_dict(data), database_url=db_url))) as client:
        reply = client.post("/v1/events", json=_event("sql-1"), headers=AUTH)
        ready = client.get("/readyz")
    assert reply.status_code == 503 and reply.headers["retry-after"].isdigit()
    assert reply.json() == {"error": "database error", "error_id": reply.json()["error_id"]}
    assert "outbox" not in ready.text and ready.status_code == 503 and ready.json()["status"] == "unavailable"
    logged = [r for r in caplog.records if reply.json()["error_id"] in r.getMessage()]
    assert logged and "outbox" in logged[0].getMessage()  # the operator still gets the detail
    assert json.loads(JsonFormatter().format(logged[0]))["error_id"] == reply.json()["error_id"]  # a log key


def test_default_database_timeout_is_bounded() -> None:
    settings = settings_module.from_dict({})
    assert 0 < settings.database_timeout_seconds <= 10
    with pytest.raises(Exception, match="database_timeout_seconds"):
        settings_module.from_dict({"database_timeout_seconds": 0})


def _one_error_line(result: Any) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return str(lines[0])


@pytest.fixture
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


COMMANDS = [["db", "upgrade"], ["serve"], ["relay", "--once"], ["ingest", "-"], ["audit", "stats"],
            ["outbox", "list"], ["verify"], ["replay"]]


@pytest.mark.usefixtures("_logging_restored")
def test_unreachable_database_is_one_line_naming_it(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://sl:s3cret-pw@127.0.0.1:{port}/ledger"
    env = {"SUBLEDGER_DATA_DIR": str(tmp_path), "SUBLEDGER_CONFIG": ""}
    for command in COMMANDS:
        result = CliRunner().invoke(cli, [*command, "--database-url", url], input="", env=env)
        line = _one_error_line(result)
        assert line == (f"error: cannot connect to the database at postgresql://sl:***@127.0.0.1:{port}/ledger: "
                        "connection refused; is it running?"), (command, line)
        assert "s3cret" not in result.output


def test_a_malformed_database_url_is_one_line_without_echoing_it(tmp_path: Path) -> None:
    env = {"SUBLEDGER_DATA_DIR": str(tmp_path), "SUBLEDGER_CONFIG": ""}
    for url in ("not-a-url", "host=h password=s3cret-pw dbname", "postgresql://u:s3cret-pw@h:5432/db?sslmode=nope x"):
        for command in COMMANDS:
            result = CliRunner().invoke(cli, [*command, "--database-url", url], input="", env=env)
            line = _one_error_line(result)
            assert line.startswith("error: config database_url: not a PostgreSQL URL"), (command, url, line)
            assert "s3cret" not in result.output and result.exit_code == 2


@pytest.mark.usefixtures("_logging_restored")
def test_never_migrated_database_is_one_line_naming_the_fix(pg_server: str, tmp_path: Path) -> None:
    name = f"sl_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    try:
        url = with_database(pg_server, name)
        env = {"SUBLEDGER_DATA_DIR": str(tmp_path), "SUBLEDGER_CONFIG": ""}
        for command in (["audit", "stats"], ["audit", "timeline", "u1"], ["outbox", "list"], ["verify"], ["replay"]):
            line = _one_error_line(CliRunner().invoke(cli, [*command, "--database-url", url], env=env))
            assert line == (f"error: the database is not migrated (revision none, need {migrate.head()}); "
                            "run `subledger db upgrade`"), (command, line)
        refused = CliRunner().invoke(cli, ["relay", "--once", "--no-migrate", "--database-url", url], env=env)
        assert f"needs {migrate.head()}" in _one_error_line(refused)
        assert migrate.current(url) is None  # nothing above migrated it
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


@contextlib.contextmanager
def _silent_database() -> Iterator[str]:
    """A URL whose host takes the TCP connection and never answers (a hung or firewalled server):
    only a connection timeout ends the wait."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # never accepted: the kernel completes the handshake, nobody speaks
        yield f"postgresql://postgres@127.0.0.1:{server.getsockname()[1]}/postgres?sslmode=disable"


def test_relay_and_scheduler_connect_within_the_configured_database_timeout(tmp_path: Path) -> None:
    """`database_timeout_seconds` bounds the relay's and the scheduler's connections too, not only
    the HTTP pool's: with 1 s, a silent database fails each in 2 s (psycopg's floor for a connect
    timeout); the default would be 5 s."""
    from subledger.app.worker import build_relay, build_scheduler
    from subledger.core.errors import StoreUnavailable

    settings = settings_module.from_dict({**config_dict(write_root(tmp_path)), "database_timeout_seconds": 1})
    with _silent_database() as url:
        services = build(settings, database_url=url)
        relay = build_relay(services)
        scheduler = build_scheduler(services, relay)
        try:
            for job in (relay.run_pass, scheduler.expiration_job):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    job()
                assert time.monotonic() - started < 4.0, job
        finally:
            relay.close()
