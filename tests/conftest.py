"""Test fixtures: a real PostgreSQL for every test, chosen as the README says.

SUBLEDGER_TEST_DATABASE_URL when set; else a testcontainers PostgreSQL when a Docker daemon
answers; else an embedded pgserver. A migrated template database is made once per session and
each test gets its own fresh copy of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg.sql
import pytest

from subledger.store import migrate, rollups
from subledger.store.db import normalize_url, with_database


def _docker_answers() -> bool:
    if not shutil.which("docker") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A URL to a PostgreSQL server where the tests may create databases."""
    url = os.environ.get("SUBLEDGER_TEST_DATABASE_URL")
    if url:
        yield normalize_url(url)
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    import pgserver

    directory = Path(tempfile.mkdtemp(prefix="sl-pg-"))
    server = pgserver.get_server(directory, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    name = f"sl_tpl_{os.getpid()}"
    _drop(pg_server, name)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    url = with_database(pg_server, name)
    migrate.upgrade(url)
    yield name
    _drop(pg_server, name)


def _drop(server: str, name: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name))
        )


@pytest.fixture
def db_url(request: pytest.FixtureRequest, pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone. At the end, every rollup the triggers kept
    must equal a fresh count of its table (whatever the test wrote, by whichever path), unless the
    test is marked `edits_tables`."""
    name = f"sl_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Identifier(template_db)
            )
        )
    url = with_database(pg_server, name)
    yield url
    if request.node.get_closest_marker("edits_tables") is None:
        _assert_rollups_agree(url)
    _drop(pg_server, name)


def _assert_rollups_agree(url: str) -> None:
    try:
        conn = psycopg.connect(url, connect_timeout=5)
    except psycopg.OperationalError:
        return  # the test stopped the server (or dropped the database): nothing to compare
    with conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        present = conn.execute("SELECT to_regclass('rollup_outbox') IS NOT NULL").fetchone()
        if present and present[0]:  # a migration test may have left an older schema
            assert rollups.drift(conn) == []


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url) as connection:
        yield connection
