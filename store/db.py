"""Where the database is: a URL the operator gives, or an embedded PostgreSQL in the data directory.

The embedded server (`pgserver`) is started on first use and left running, so later commands
reuse it instead of paying its start-up again. Driver errors are translated here, at one door.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
from psycopg_pool import ConnectionPool

from subledger.core.errors import Conflict, StoreError, StoreUnavailable

DEFAULT_DATA_DIR = ".subledger"
# How long a caller waits for the database (a pooled connection, or a new connection) before it is
# told the database is unavailable; `database_timeout_seconds` in the settings.
DEFAULT_TIMEOUT_SECONDS = 5.0
# While the pool's last connection attempt failed, a request waits only this long: it still starts
# a fresh attempt (so the first request after the database returns succeeds), but a crowd of
# requests during an outage cannot pile up behind the full timeout.
DOWN_WAIT_SECONDS = 1.0


def data_dir() -> Path:
    return Path(os.environ.get("SUBLEDGER_DATA_DIR", DEFAULT_DATA_DIR)).resolve()


def embedded_url(directory: Path | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL under `directory/pgdata` and return its URL."""
    import warnings

    pgdata = (directory or data_dir()) / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); pgserver copes.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pgserver  # imported late: starting a server is a run-time decision, not an import-time one

        server = pgserver.get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


def resolve_url(explicit: str | None = None) -> str:
    """`explicit`, else SUBLEDGER_DATABASE_URL, else the embedded server."""
    url = explicit or os.environ.get("SUBLEDGER_DATABASE_URL")
    return normalize_url(url) if url else embedded_url()


def normalize_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs too (postgresql+psycopg://) for psycopg's sake."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg://" + normalize_url(url)[len("postgresql://") :]


def display_url(url: str) -> str:
    """The URL as an operator may see it in a terminal or a log: the password is masked."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(normalize_url(url))
    except psycopg.Error:
        return "(an unparseable database URL)"
    user, password = str(params.get("user") or ""), params.get("password")
    auth = f"{user}:***@" if password else (f"{user}@" if user else "")
    host, port, dbname = str(params.get("host") or ""), params.get("port"), params.get("dbname") or ""
    query = ""
    if host.startswith("/"):  # a Unix socket directory (the embedded server) goes in the query
        host, query = "", f"?host={host}"
    return f"postgresql://{auth}{host}{f':{port}' if port else ''}/{dbname}{query}"


_FATAL = re.compile(r"FATAL:\s+(.*)$")


def connect_failure(exc: BaseException, url: str) -> str:
    """One line naming where and why a connection failed, without libpq's multi-line prose."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "connection refused" in low or "no such file or directory" in low:
        reason = "connection refused; is it running?"
    elif "timeout expired" in low or "timed out" in low:
        reason = "no answer in time; is the host reachable?"
    elif "failed to resolve host" in low or "could not translate host name" in low:
        reason = "unknown host; check the host name in the URL"
    elif (fatal := _FATAL.search(text)) is not None:
        reason = fatal.group(1)
        if "does not exist" in reason and reason.startswith("database"):
            reason += "; create it (createdb) or fix the URL"
    else:
        reason = text.rsplit(" failed: ", 1)[-1] or type(exc).__name__
    return f"cannot connect to the database at {display_url(url)}: {reason}"


def connect(url: str, *, autocommit: bool = False, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> psycopg.Connection:
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=max(1, round(timeout)))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(connect_failure(exc, url)) from exc
    # A crashed client must never pin locks or the vacuum horizon for long.
    conn.execute("SET idle_in_transaction_session_timeout = '60s'")
    if not autocommit:
        conn.commit()
    return conn


def _configure(conn: psycopg.Connection) -> None:
    conn.execute("SET idle_in_transaction_session_timeout = '60s'")
    conn.commit()


class Pool(ConnectionPool[psycopg.Connection]):
    """psycopg's pool, tuned so a database outage is a short, bounded wait and recovery is prompt.

    - every connection is checked before it is handed out, and one that fails its check makes the
      pool check all its idle ones at once: after a restart the stale connections are dropped in
      one sweep instead of each costing a request a failure (and psycopg's growing check delays);
    - failed reconnection attempts give up quickly (`reconnect_timeout`), so the next request
      starts a fresh attempt instead of waiting out psycopg's doubling backoff (up to minutes);
    - while the last connection attempt failed, a request waits at most `DOWN_WAIT_SECONDS`.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS, max_size: int = 8,
                 name: str = "subledger") -> None:
        self.down_since: float | None = None
        self._health = threading.Lock()
        pool = self

        class Watched(psycopg.Connection):  # type: ignore[type-arg]
            """Records whether the pool's last attempt to connect succeeded."""

            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.OperationalError:
                    pool._record(up=False)
                    raise
                pool._record(up=True)
                return conn

        super().__init__(
            url, connection_class=Watched, min_size=1, max_size=max_size, open=False, name=name,
            configure=_configure, check=self._check_or_sweep, timeout=timeout,
            reconnect_timeout=max(2.0, min(timeout, 5.0)), kwargs={"connect_timeout": max(1, round(timeout))},
        )

    def _record(self, *, up: bool) -> None:
        with self._health:
            if up:
                self.down_since = None
            elif self.down_since is None:
                self.down_since = time.monotonic()

    def _check_or_sweep(self, conn: psycopg.Connection) -> None:
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            self.check()  # the others were most likely cut by the same restart
            raise

    def getconn(self, timeout: float | None = None) -> psycopg.Connection:
        wait = self.timeout if timeout is None else timeout
        if self.down_since is not None:
            wait = min(wait, DOWN_WAIT_SECONDS)
        return super().getconn(wait)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Map driver errors onto subledger's tree; duplicates are values elsewhere, never exceptions."""
    try:
        yield
    except (psycopg.errors.UniqueViolation, psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected) as exc:
        raise Conflict(_one_line(exc)) from exc
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"database unavailable: {_one_line(exc)}") from exc
    except psycopg.Error as exc:
        raise StoreError(_one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (hints, tabs); an operator's error line and a log line do not."""
    return " ".join(str(exc).split()) or type(exc).__name__


def with_database(url: str, name: str) -> str:
    """The same server, another database."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(normalize_url(url))
    params["dbname"] = name
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


def recreate_database(url: str, name: str) -> str:
    """Drop and create `name` on the server of `url` (needs CREATEDB); return its URL."""
    with psycopg.connect(normalize_url(url), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return with_database(url, name)
