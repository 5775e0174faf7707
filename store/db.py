"""Where the database is: a URL the operator gives, or an embedded PostgreSQL in the data directory.

The embedded server (`pgserver`) is started on first use and left running, so later commands
reuse it instead of paying its start-up again.

Driver errors are translated here, at one door: every connection subledger opens (`connect`,
`Pool`) is a `Connection` whose cursors, commits, transactions and notifications raise subledger's
tree (`translate`, pinned by tests/test_errors.py), so store functions raise StoreErrors without
each remembering to, and no layer above store/ imports psycopg's errors. Inside store/, code that
reacts to one failure (a locked row) on a connection it did not open wraps the statement in
`translate_errors()` and catches the subledger type. A driver error our own code caused (a cursor
used wrongly: psycopg's client-side ProgrammingError/InterfaceError) is a bug, not a database
failure, and is left as it is so it surfaces as one (a 500 with its traceback logged).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import psycopg
import psycopg.sql
from psycopg import errors as pg
from psycopg.rows import Row
from psycopg_pool import ConnectionPool

from subledger.core.errors import (
    ConfigError,
    Conflict,
    Locked,
    PermissionDenied,
    SchemaNotCurrent,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    ValueRefused,
)

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
        # imported late: starting a server is a run-time decision, not an import-time one
        from pgserver.postgres_server import get_server

        server = get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


def resolve_url(explicit: str | None = None) -> str:
    """`explicit`, else SUBLEDGER_DATABASE_URL, else the embedded server; a URL libpq cannot read
    is a one-line configuration error here, before anything tries to connect with it."""
    url = explicit or os.environ.get("SUBLEDGER_DATABASE_URL")
    if not url:
        return embedded_url()
    url = normalize_url(url)
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's message quotes the text, which may hold a password: name the expected forms instead
        raise ConfigError(
            "database_url",
            "not a PostgreSQL URL (postgresql://user:password@host:5432/dbname) or key=value connection string",
        ) from None
    return url


def normalize_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs too (postgresql+psycopg://) for psycopg's sake."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


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


def connect(url: str, *, autocommit: bool = False, timeout: float = DEFAULT_TIMEOUT_SECONDS,
            translated: bool = True) -> psycopg.Connection:
    """A connection raising subledger's tree (`Connection`); `translated=False` gives psycopg's own,
    for SQLAlchemy (Alembic), which must see driver errors to wrap them."""
    kind: type[psycopg.Connection] = Connection if translated else psycopg.Connection
    try:
        conn = kind.connect(url, autocommit=autocommit, connect_timeout=max(1, round(timeout)))
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

        class Watched(Connection[Any]):
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
        return _translated(lambda: super(Pool, self).getconn(wait))  # PoolTimeout: StoreUnavailable


# -- the door: driver errors onto subledger's tree ------------------------------------------------

# SQLSTATEs named by class (the first two characters) or in full; checked before psycopg's classes.
_SCHEMA_STATES = frozenset({"42P01", "42703", "42883", "42704"})  # undefined table/column/function/object
_LOST_STATES = frozenset({"25P03", "57P01", "57P02", "57P03"})  # idle timeout, admin/crash shutdown, starting


def translate(exc: psycopg.Error) -> StoreError:
    """The one mapping from a driver error to subledger's tree (table in tests/test_errors.py).

    Transient (a retry may pass): Conflict (unique/serialization/deadlock), StoreUnavailable (no
    connection, connection lost, server shutting down, pool exhausted, out of resources),
    StoreTimeout (statement cancelled), Locked (lock_timeout). Permanent: PermissionDenied,
    SchemaNotCurrent, ValueRefused, and StoreError for everything else. Duplicates are values
    elsewhere, never exceptions; this is only for what the database refused.
    """
    text = _one_line(exc)
    state = exc.sqlstate or ""
    if isinstance(exc, pg.UniqueViolation | pg.SerializationFailure | pg.DeadlockDetected):
        return Conflict(text)
    if isinstance(exc, pg.LockNotAvailable):
        return Locked(f"a row is locked by another transaction: {text}")
    if isinstance(exc, pg.QueryCanceled):
        return StoreTimeout(f"database statement cancelled: {text}")
    if isinstance(exc, pg.InsufficientPrivilege):
        return PermissionDenied(text)
    if state in _SCHEMA_STATES:
        return SchemaNotCurrent(text)
    if isinstance(exc, psycopg.DataError):
        return ValueRefused(text)
    if isinstance(exc, psycopg.OperationalError) or state in _LOST_STATES:
        return StoreUnavailable(f"database unavailable: {text}")
    return StoreError(text)


def _ours(exc: psycopg.Error) -> bool:
    """A driver error our code caused (no SQLSTATE: a closed cursor, no result to fetch, wrong
    parameters): a bug to surface as one, not a database failure to answer 503."""
    return exc.sqlstate is None and isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise a driver error as `translate` maps it (for connections subledger did not open)."""
    try:
        yield
    except psycopg.Error as exc:
        if _ours(exc):
            raise
        raise translate(exc) from exc


T = TypeVar("T")


def _translated(call: Callable[[], T]) -> T:
    try:
        return call()
    except psycopg.Error as exc:
        if _ours(exc):
            raise
        raise translate(exc) from exc


class Cursor(psycopg.Cursor[Row]):
    """psycopg's cursor, raising subledger's tree (client-side cursors keep every result after
    `execute`, so fetching needs no translation)."""

    __slots__ = ()

    def execute(self, *args: Any, **kwargs: Any) -> Self:
        return _translated(lambda: super(Cursor, self).execute(*args, **kwargs))

    def executemany(self, *args: Any, **kwargs: Any) -> None:
        _translated(lambda: super(Cursor, self).executemany(*args, **kwargs))

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Row]:
        with translate_errors():
            yield from super().stream(*args, **kwargs)

    @contextlib.contextmanager
    def copy(self, *args: Any, **kwargs: Any) -> Iterator[psycopg.Copy]:
        with translate_errors(), super().copy(*args, **kwargs) as copy:
            yield copy


class ServerCursor(psycopg.ServerCursor[Row]):
    """A named (server-side) cursor raising subledger's tree: it reads from the server as it goes."""

    __slots__ = ()

    def execute(self, *args: Any, **kwargs: Any) -> Self:
        return _translated(lambda: super(ServerCursor, self).execute(*args, **kwargs))

    def fetchone(self) -> Row | None:
        return _translated(super().fetchone)

    def fetchmany(self, size: int = 0) -> list[Row]:
        return _translated(lambda: super(ServerCursor, self).fetchmany(size))

    def fetchall(self) -> list[Row]:
        return _translated(super().fetchall)

    def __next__(self) -> Row:
        return _translated(super().__next__)

    def scroll(self, value: int, mode: str = "relative") -> None:
        _translated(lambda: super(ServerCursor, self).scroll(value, mode))

    def close(self) -> None:
        _translated(super().close)


class Connection(psycopg.Connection[Row]):
    """The connection every subledger process uses: statements, commits, transactions and
    notifications raise subledger's tree, so callers above store/ catch StoreError, not psycopg."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = Cursor
        self.server_cursor_factory = ServerCursor

    # cursor() and execute() check the connection first: "the connection is closed" comes from them
    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return _translated(lambda: super(Connection, self).cursor(*args, **kwargs))

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return _translated(lambda: super(Connection, self).execute(*args, **kwargs))

    def commit(self) -> None:
        _translated(super().commit)

    def rollback(self) -> None:
        _translated(super().rollback)

    @contextlib.contextmanager
    def transaction(self, *args: Any, **kwargs: Any) -> Iterator[psycopg.Transaction]:
        with translate_errors(), super().transaction(*args, **kwargs) as tx:
            yield tx

    def notifies(self, *args: Any, **kwargs: Any) -> Generator[psycopg.Notify, None, None]:
        with translate_errors():
            yield from super().notifies(*args, **kwargs)


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
