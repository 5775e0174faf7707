"""The service runs as a login role that is only a member of `subledger_app`, as the README advises.

The schema is migrated by its owner; `serve`, `relay` and `ingest` run as the application role on a
current schema without migrating it, refuse one that is behind in one line naming the revision
needed, and migrate at start only when the role is allowed to (the owner) or told to.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import psycopg.sql
import pytest
from fake_segment import APP, FakeSegment, lifecycle, outbox_counts, write_config
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner

from subledger.app.cli import app as cli
from subledger.store import migrate
from subledger.store.db import with_database

SUBLEDGER = str(Path(sys.executable).parent / "subledger")
TOKEN = "lp-token"


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`relay` configures the root logger onto CliRunner's stream, which is closed once it returns."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def as_role(url: str, user: str, password: str) -> str:
    params = {k: v for k, v in conninfo_to_dict(url).items() if v is not None}
    params.update(user=user, password=password)
    return make_conninfo("", **params)


@pytest.fixture
def app_role(pg_server: str) -> Iterator[tuple[str, str]]:
    """A LOGIN role whose only privilege is membership of subledger_app: (name, password)."""
    name, password = f"sl_app_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN CREATE ROLE subledger_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE subledger_app").format(
            psycopg.sql.Identifier(name), psycopg.sql.Literal(password)))
    try:
        yield name, password
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


@pytest.fixture
def behind_db(pg_server: str) -> Iterator[str]:
    """A database its owner migrated to the revision before head: this subledger's schema is newer."""
    name = f"sl_lp_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = with_database(pg_server, name)
    try:
        previous = migrate._script().get_revision(migrate.head()).down_revision
        assert isinstance(previous, str)
        migrate.upgrade(url, previous)
        yield url
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "SUBLEDGER_DATA_DIR": str(tmp_path / "data"), "SUBLEDGER_API_TOKEN": TOKEN,
           "SUBLEDGER_LOG_FORMAT": "json"}
    for key in ("SUBLEDGER_CONFIG", "SUBLEDGER_DATABASE_URL", "SUBLEDGER_MIGRATE"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(tmp_path: Path) -> Path:
    start = datetime.now(UTC) - timedelta(days=30)
    lines = [json.dumps(e) for n in (1, 2) for e in lifecycle(n, start=start, prefix="lp")]
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_app_role_runs_ingest_relay_and_serve(db_url: str, app_role: tuple[str, str], tmp_path: Path) -> None:
    url = as_role(db_url, *app_role)
    runner = CliRunner()
    with FakeSegment() as fake:
        config = write_config(tmp_path / "c.toml", fake.url)
        base = ["--config", str(config), "--database-url", url]
        ingested = runner.invoke(cli, ["ingest", str(_events(tmp_path)), "--json", *base], env=_env(tmp_path))
        assert ingested.exit_code == 0, ingested.output
        summary = json.loads(ingested.stdout.strip().splitlines()[-1])
        assert summary["new"] > 0 and summary["rejected"] == 0
        relayed = runner.invoke(cli, ["relay", "--once", "--json", *base], env=_env(tmp_path))
        assert relayed.exit_code == 0, relayed.output
        counts = json.loads(relayed.stdout.strip().splitlines()[-1])
        assert counts["delivered"] == summary["transitions"] and counts["dead"] == 0
        assert outbox_counts(db_url) == {"delivered": summary["transitions"]}

        # serve, with its relay and scheduled jobs, as the same role: an event in, delivered out
        port = _free_port()
        proc = subprocess.Popen([SUBLEDGER, "serve", "--port", str(port), *base], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env(tmp_path))
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    ready = httpx.get(f"{base_url}/readyz", timeout=2)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "serve exited at start"
                    assert time.monotonic() < deadline, "serve never answered"
                    time.sleep(0.1)
            assert ready.status_code == 200, ready.text
            event = {"id": "lp-serve-1", "app_id": APP, "type": "purchase", "subscription_id": "lp-serve",
                     "store": "app_store", "environment": "production", "app_user_id": "u-serve",
                     "occurred_at": datetime.now(UTC).isoformat(), "product_id": "monthly", "price": "9.99",
                     "currency": "USD", "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat()}
            posted = httpx.post(f"{base_url}/v1/events", json=event, timeout=10,
                                headers={"Authorization": f"Bearer {TOKEN}"})
            assert posted.status_code == 200, posted.text
            assert posted.json()["result"] == "new"
            timeline = httpx.get(f"{base_url}/v1/audit/timeline/u-serve", timeout=10,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
            assert timeline.status_code == 200, timeline.text
            deadline = time.monotonic() + 20
            while outbox_counts(db_url).get("pending", 0) or outbox_counts(db_url)["delivered"] <= counts["delivered"]:
                assert time.monotonic() < deadline, "serve's relay delivered nothing"
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
    assert "permission denied" not in output, output
    assert "Traceback" not in output, output
    with psycopg.connect(db_url) as conn:  # nothing was migrated by the app role, nothing needed it
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (migrate.head(),)


def test_app_role_refuses_a_schema_behind_in_one_line(
    behind_db: str, app_role: tuple[str, str], tmp_path: Path
) -> None:
    url = as_role(behind_db, *app_role)
    for command in (["relay", "--once"], ["ingest", "-"], ["serve", "--no-migrate"], ["relay", "--migrate"]):
        result = CliRunner().invoke(cli, [*command, "--database-url", url], input="", env=_env(tmp_path))
        assert result.exit_code == 2, (command, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, result.stderr)
        assert "Traceback" not in result.output
        if "--migrate" in command:  # told to, and tried: the database said no, and the line says who may
            assert "may not migrate" in lines[0] and "as the schema owner" in lines[0], lines[0]
        else:  # not even tried: the revision is read, and the line names the one needed
            assert f"needs {migrate.head()}" in lines[0] and "subledger db upgrade" in lines[0], lines[0]
            assert "permission denied" not in lines[0]
        assert app_role[1] not in result.output  # the password is masked wherever the URL is shown
    assert migrate.current(behind_db) != migrate.head()


def test_owner_migrates_at_start_unless_told_not_to(behind_db: str, tmp_path: Path) -> None:
    runner = CliRunner()
    refused = runner.invoke(cli, ["relay", "--once", "--no-migrate", "--database-url", behind_db],
                            env=_env(tmp_path))
    assert refused.exit_code == 2 and "was told not to migrate" in refused.stderr, refused.output
    assert migrate.current(behind_db) != migrate.head()
    done = runner.invoke(cli, ["relay", "--once", "--json", "--database-url", behind_db], env=_env(tmp_path))
    assert done.exit_code == 0, done.output
    assert "migrated from revision" in done.stderr and migrate.current(behind_db) == migrate.head()
