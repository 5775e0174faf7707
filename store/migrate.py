"""Apply the Alembic migrations shipped inside the package, and tell whether a database needs them.

Long-running commands run as the application role (a member of `subledger_app`), which may use the
schema but not change it. So they read the schema's revision first and migrate only when they are
allowed to (the role owns the schema) or told to; otherwise a schema that is behind is one clear
refusal naming the revision needed, not `permission denied for table alembic_version`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, exc, pool

from subledger.core.errors import SchemaNotCurrent, StoreError, StoreUnavailable
from subledger.store.db import DEFAULT_TIMEOUT_SECONDS, connect, display_url, normalize_url, translate_errors

# Two processes migrating one database at once must not both run a revision.
MIGRATION_LOCK = 0x5B1ED6E5
UPGRADE = "run `subledger db upgrade`"


@dataclass(frozen=True)
class Schema:
    """What a connection sees of the schema: its revision (None: never migrated) and who may change it."""

    revision: str | None
    readable: bool  # False: alembic_version exists but this role may not read it
    head: str
    role: str
    may_migrate: bool

    @property
    def current(self) -> bool:
        return self.readable and self.revision == self.head

    @property
    def behind(self) -> bool:
        """Older than head (or never migrated); an unknown revision is a newer subledger's schema."""
        return not self.readable or self.revision is None or self.revision in _known() - {self.head}

    def problem(self) -> str:
        """One line saying what is wrong with this schema and what to do (empty when current)."""
        if self.current:
            return ""
        if not self.readable:
            return (f"role {self.role!r} cannot read the schema revision (no SELECT on alembic_version); "
                    f"the schema predates revision {self.head}: {UPGRADE} as the schema owner")
        if self.revision is None:
            return f"the database is not migrated (revision none, need {self.head}); {UPGRADE}"
        if not self.behind:
            return (f"the database schema is at revision {self.revision}, which this subledger does not know "
                    f"(it needs {self.head}): a newer subledger migrated it; upgrade subledger")
        return f"the database schema is at revision {self.revision}, need {self.head}; {UPGRADE}"


def _engine(url: str, timeout: float) -> Engine:
    conninfo = normalize_url(url)
    # StoreUnavailable from connect() is no DBAPI error, so SQLAlchemy lets it through unwrapped:
    # an unreachable database is one line, not a 134-line traceback. The connection itself is
    # psycopg's own (untranslated): SQLAlchemy must see driver errors to wrap them (DBAPIError).
    return create_engine("postgresql+psycopg://",
                         creator=lambda: connect(conninfo, timeout=timeout, translated=False),
                         poolclass=pool.NullPool)


def _config() -> Config:
    import subledger.migrations as package

    here = Path(package.__file__).resolve().parent
    config = Config(str(here / "alembic.ini"))
    config.set_main_option("script_location", str(here))
    config.set_main_option("version_locations", str(here / "versions"))
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this subledger needs."""
    found = _script().get_current_head()
    assert found is not None, "the package ships no migrations"
    return found


@functools.cache
def _known() -> frozenset[str]:
    return frozenset(s.revision for s in _script().walk_revisions())


def upgrade(url: str, revision: str = "head", *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
    """Migrate to `revision`; failures are one-line StoreErrors (unreachable, not allowed, failed)."""
    engine = _engine(url, timeout)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            config = _config()
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    except exc.DBAPIError as error:
        raise _migration_error(error.orig, url) from error
    finally:
        engine.dispose()


def _migration_error(orig: BaseException | None, url: str) -> StoreError:
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if isinstance(orig, psycopg.errors.InsufficientPrivilege):
        return StoreError(f"this role may not migrate the database at {display_url(url)} ({first}); "
                          f"{UPGRADE} as the schema owner")
    if isinstance(orig, psycopg.OperationalError):
        return StoreUnavailable(f"the database at {display_url(url)} failed during the migration: {first}")
    return StoreError(f"the migration failed: {first}")


def inspect(conn: psycopg.Connection) -> Schema:
    """Read the schema's revision and whether this role may migrate it; leaves no transaction open."""
    try:
        with translate_errors():
            role, exists, may_migrate = conn.execute(
                """
                SELECT current_user, c.oid IS NOT NULL,
                       CASE WHEN c.oid IS NOT NULL THEN pg_has_role(current_user, c.relowner, 'USAGE')
                            ELSE has_schema_privilege(current_user, 'public', 'CREATE') END
                FROM (SELECT to_regclass('public.alembic_version') AS oid) t
                LEFT JOIN pg_class c ON c.oid = t.oid
                """
            ).fetchone() or ("?", False, False)
            revision: str | None = None
            readable = True
            if exists:
                if conn.execute("SELECT has_table_privilege(current_user, 'public.alembic_version', 'SELECT')"
                                ).fetchone() == (True,):
                    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                    revision = row[0] if row else None
                else:
                    readable = False
    except StoreUnavailable as error:
        detail = error.__cause__ if error.__cause__ is not None else error
        raise StoreUnavailable(f"the database failed while reading the schema revision: {detail}") from error
    finally:
        if not conn.autocommit:
            conn.rollback()
    return Schema(revision=revision, readable=readable, head=head(), role=str(role), may_migrate=bool(may_migrate))


def require_current(conn: psycopg.Connection) -> Schema:
    """For commands that read or repair the ledger (audit, outbox, verify, replay): never migrate."""
    schema = inspect(conn)
    if not schema.current:
        raise SchemaNotCurrent(schema.problem())
    return schema


def prepare(url: str, *, migrate: bool | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    """The start of serve, relay and ingest: make sure the schema is current; say what was done.

    `migrate`: None migrates a schema that is behind only when this role may (it owns the schema, or
    may create it in an empty database); True always tries; False never does. A schema that is
    current just runs, whoever the role is."""
    with connect(url, timeout=timeout) as conn:
        schema = inspect(conn)
    if schema.current:
        return f"database schema at revision {schema.head}"
    if not schema.behind:
        raise SchemaNotCurrent(schema.problem())
    if migrate is False or (migrate is None and not schema.may_migrate):
        was = "none" if schema.revision is None else (schema.revision if schema.readable else "unreadable")
        raise SchemaNotCurrent(
            f"the database schema is at revision {was}, this subledger needs {schema.head}, and role "
            f"{schema.role!r} {'was told not to' if migrate is False else 'may not'} migrate it; "
            f"{UPGRADE} as the schema owner" + ("" if migrate is False else ", or start with --migrate")
        )
    upgrade(url, timeout=timeout)
    return f"database schema migrated from revision {schema.revision or 'none'} to {schema.head}"


def current(url: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str | None:
    with connect(url, timeout=timeout) as conn:
        return inspect(conn).revision
