"""What every `subledger` command shares: the consoles, the options, one-line errors, services and connections.

Defined once so that every command spells `--config` and `--database-url` the same way, refuses
in the same one line (`error: ...`, exit 2), and opens the database the same way. Command modules
import this one; it imports none of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.console import Console
from rich.text import Text

from subledger.app import settings as settings_module
from subledger.app.bootstrap import Services, build
from subledger.core.errors import ConfigError, StoreError
from subledger.core.events import EARLIEST_TIME, LATEST_TIME, TIME_RANGE
from subledger.store.audit import jsonable
from subledger.store.db import connect

# markup off: what the CLI prints is mostly stored data (ids, app user ids, reasons) that a webhook or
# an API caller chose, and "[/i]" in it must print as itself, never be parsed as a style tag
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)  # a line stays one line when piped

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML configuration file (default: $SUBLEDGER_CONFIG).")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="PostgreSQL URL (default: $SUBLEDGER_DATABASE_URL, else embedded)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
MigrateOption = Annotated[
    bool | None,
    typer.Option("--migrate/--no-migrate", help="At start, migrate a schema that is behind: --migrate always "
                 "tries, --no-migrate never does; default (setting `migrate`): only when this role owns the schema."),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: <message>` and return the Exit to raise (`raise fail(...) from None`)."""
    # One line whatever the width (no wrapping when piped); the message is text, never markup.
    err.print(Text.assemble(("error:", "red"), " ", message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def services_for(config: Path | None, database_url: str | None) -> Services:
    """Settings loaded and services built, or one error line (a config or database URL problem)."""
    try:
        loaded = settings_module.load(config)
        return build(loaded, database_url=database_url)
    except (ConfigError, StoreError) as exc:
        raise fail(str(exc)) from None


def prepare_schema(services: Services, migrate_flag: bool | None,
                   announce: Callable[[str], object] | None = None) -> None:
    """serve/relay/ingest: run on a current schema; migrate only when allowed or told to (one line if not).

    `announce` tells of a migration done: a log line for serve and relay (so their stderr stays one
    format, JSON when not on a terminal), a printed line for ingest."""
    from subledger.store import migrate  # deferred: Alembic and SQLAlchemy (~1 s) load only to open a database

    chosen = services.settings.migrate if migrate_flag is None else migrate_flag
    try:
        done = migrate.prepare(services.database_url, migrate=chosen, timeout=services.database_timeout)
    except StoreError as exc:
        raise fail(str(exc)) from None
    if "migrated" in done:
        if announce is None:
            err.print(done, highlight=False)
        else:
            announce(done)
    changed = _apply_chains(services)
    if changed:
        if announce is None:
            err.print(changed, highlight=False)
        else:
            announce(changed)


def _apply_chains(services: Services) -> str | None:
    """`[log] chains`, when the configuration names it, made true of the log (store.log.set_chains:
    a new epoch from the current heads, nothing written changes); the line to announce when it
    changed. A configuration without it changes nothing, so a process started with a bare config
    (an `ingest` from a laptop) never turns a partitioned log back into one chain."""
    from subledger.store import log  # deferred with the rest of the store

    if "chains" not in services.settings.log.model_fields_set:
        return None  # a configuration that does not name it leaves the log's chains as they are
    wanted = services.settings.log.chains
    try:
        with connect(services.database_url, timeout=services.database_timeout) as conn:
            if log.epochs(conn)[-1].chains == wanted:
                return None
            epoch = log.set_chains(conn, wanted, datetime.now(UTC))
    except StoreError as exc:
        raise fail(str(exc)) from None
    if epoch is None:
        return None
    return (f"the log now appends to {wanted} hash chain{'s' if wanted != 1 else ''} from position "
            f"{epoch.first_position} (epoch {epoch.epoch}; [log] chains)")


@contextmanager
def connection(config: Path | None, database_url: str | None) -> Iterator[tuple[Services, psycopg.Connection]]:
    """Services and a connection; database errors become one clear error line and exit code 2.

    These commands read or repair the ledger and never migrate: a schema that is not current is
    refused up front (`run subledger db upgrade`), not met as raw SQL errors halfway through."""
    from subledger.store import migrate  # deferred: Alembic and SQLAlchemy (~1 s) load only to open a database

    services = services_for(config, database_url)
    try:
        conn = connect(services.database_url, timeout=services.database_timeout)
        try:
            migrate.require_current(conn)
            yield services, conn
        finally:
            conn.close()
    except StoreError as exc:
        raise fail(str(exc)) from None


def parse_when(text: str, name: str) -> datetime:
    """RFC 3339, or a bare date / date-time read as UTC: what an operator types at a prompt."""
    value = text.strip().replace("z", "Z")
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{name}: not a time: {text!r} (try 2026-11-28T12:00:00Z)") from None
    try:  # `0001-01-01T00:00:00+14:00` overflows in UTC; the range is the one events may name
        instant = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        instant = None
    if instant is None or not EARLIEST_TIME <= instant < LATEST_TIME:
        raise fail(f"{name}: {TIME_RANGE}")
    return instant


def print_json(data: Any) -> None:
    print(json.dumps(jsonable(data), indent=2, ensure_ascii=False))


def shown_time(value: datetime | None) -> str:
    """A time in a table cell: UTC, to the second; nothing for none."""
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
