"""The `subledger` command line: the root command, its groups, and the console script `main`.

One module per command group (`db`, `ingest`, `run`: serve/relay/sink/demo, `audit`, `outbox`,
`maintenance`: replay/verify, `retention`: prune); what they share (consoles, options, one-line
errors, services and connections) is `app.cli.common`. This module only assembles them, and no
command module imports it, so the package has no import cycle. Nothing runs at import.
"""

from __future__ import annotations

from typing import Annotated

import typer

import subledger.app.cli.reconcile_apple  # registers `reconcile apple`
import subledger.app.cli.reconcile_google  # noqa: F401  (registers `reconcile google`)
from subledger.app.cli import audit, db, ingest, maintenance, outbox, reconcile, retention, run
from subledger.app.cli.common import fail, out
from subledger.app.settings import package_version
from subledger.app.wording import plain

app = typer.Typer(
    help="subledger: store notifications in, lifecycle events to Segment out, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(db.db_app, name="db")
app.add_typer(audit.audit_app, name="audit")
app.add_typer(outbox.outbox_app, name="outbox")
app.add_typer(reconcile.reconcile_app, name="reconcile")
app.command("replay")(maintenance.replay)
app.command("verify")(maintenance.verify)
app.command("prune")(retention.prune)
app.command("ingest")(ingest.ingest)
app.command("serve")(run.serve)
app.command("relay")(run.relay)
app.command("sink")(run.sink)
app.command("demo")(run.demo)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(package_version())


def _show_version(value: bool) -> None:
    if value:
        print(f"subledger {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_show_version)
    ] = False,
) -> None:
    """subledger: store notifications in, lifecycle events to Segment out, exactly once."""


def _click_exceptions() -> tuple[type[Exception], type[Exception]]:
    """(ClickException, NoArgsIsHelpError) of the click typer runs on (newer typers vendor their own)."""
    # an optional import: which module exists depends on the installed typer
    try:
        from typer._click import exceptions as click_exceptions  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # typer < 0.25 runs on click itself
        from click import exceptions as click_exceptions  # type: ignore[no-redef,unused-ignore]
    no_args = getattr(click_exceptions, "NoArgsIsHelpError", None) or click_exceptions.UsageError
    return click_exceptions.ClickException, no_args


def main() -> None:
    """The console script: a usage error is one line (`error: ...`), as every other refusal is."""
    click_exception, no_args = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except no_args:
        code = 2  # the help was printed
    except click_exception as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        message = plain(exc.format_message()) + hint  # type: ignore[attr-defined]
        raise SystemExit(fail(message, getattr(exc, "exit_code", 2)).exit_code) from None
    except (KeyboardInterrupt, EOFError):
        code = 130
    raise SystemExit(code if isinstance(code, int) else 0)
