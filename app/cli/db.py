"""`subledger db ...`: the embedded PostgreSQL (status, stop) and the schema (upgrade)."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from subledger.app.cli.common import ConfigOption, DatabaseOption, fail, out, services_for
from subledger.core.errors import StoreError
from subledger.store import embedded
from subledger.store.db import display_url

db_app = typer.Typer(help="Database management.", no_args_is_help=True)


@db_app.command("status")
def db_status(as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False) -> None:
    """Is the embedded PostgreSQL running? Its data directory and URL (never starts it)."""
    found = embedded.status()
    configured = os.environ.get("SUBLEDGER_DATABASE_URL")
    if as_json:
        print(json.dumps({"running": found.running, "pid": found.pid, "data_dir": str(found.data_dir),
                          "url": found.url, "database_url": display_url(configured) if configured else None}))
        return
    state = f"running (pid {found.pid})" if found.running else "not running"
    out.print(f"embedded PostgreSQL: {state}", highlight=False)
    out.print(f"data directory: {found.pgdata}", highlight=False)
    if found.url:
        out.print(f"url: {found.url}", highlight=False, soft_wrap=True)
    if configured:
        out.print(f"note: SUBLEDGER_DATABASE_URL is set, so commands use {display_url(configured)}, "
                  "not the embedded server", highlight=False, soft_wrap=True)
    elif not found.running:
        out.print("it starts on the next command that needs a database (e.g. `subledger db upgrade`)",
                  highlight=False, soft_wrap=True)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL cleanly (a fast shutdown; it starts again when next needed)."""
    try:
        stopped = embedded.stop()
    except TimeoutError as exc:
        raise fail(str(exc), 1) from None
    where = embedded.status().pgdata
    out.print(f"stopped the embedded PostgreSQL ({where})" if stopped
              else f"the embedded PostgreSQL is not running ({where})", highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """Apply the database migrations (run as the schema owner; serve, relay and ingest check the revision)."""
    from subledger.store import migrate  # deferred: Alembic and SQLAlchemy (~1 s) load only to migrate

    services = services_for(config, database_url)
    try:
        migrate.upgrade(services.database_url, timeout=services.database_timeout)
        revision = migrate.current(services.database_url, timeout=services.database_timeout)
    except StoreError as exc:
        raise fail(str(exc)) from None
    out.print(f"database at revision {revision}")
