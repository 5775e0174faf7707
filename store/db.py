"""Where the database is: a URL the operator gives, or an embedded PostgreSQL in the data directory.

The embedded server (`pgserver`) is started on first use and left running, so later commands
reuse it instead of paying its start-up again. Driver errors are translated here, at one door.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import psycopg.sql

from subledger.core.errors import Conflict, StoreError, StoreUnavailable

DEFAULT_DATA_DIR = ".subledger"


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


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"cannot connect to the database: {exc}".strip()) from exc
    # A crashed client must never pin locks or the vacuum horizon for long.
    conn.execute("SET idle_in_transaction_session_timeout = '60s'")
    if not autocommit:
        conn.commit()
    return conn


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Map driver errors onto subledger's tree; duplicates are values elsewhere, never exceptions."""
    try:
        yield
    except (psycopg.errors.UniqueViolation, psycopg.errors.SerializationFailure,
            psycopg.errors.DeadlockDetected) as exc:
        raise Conflict(str(exc)) from exc
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except psycopg.Error as exc:
        raise StoreError(str(exc)) from exc


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
