"""`subledger replay` and `subledger verify`: rebuild from the log, and prove log and projections intact."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from subledger.app.cli.common import ConfigOption, DatabaseOption, JsonOption, connection, err, out
from subledger.app.progress import counting
from subledger.app.wording import plural
from subledger.outbox.ingest import wake_relay
from subledger.outbox.replay import replay as run_replay
from subledger.outbox.replay import total_subscriptions
from subledger.store import verify_runs
from subledger.store.verify import sizes
from subledger.store.verify import verify as run_verify


def replay(
    subscription: Annotated[
        str | None, typer.Option("--subscription", help="Only this subscription key (app_id/store/id).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the differences; change nothing.")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Rebuild projections, transitions and missing outbox rows from the log (never a second messageId)."""
    with connection(config, database_url) as (services, conn):
        show = sys.stderr.isatty() and not as_json and subscription is None
        if show:
            total = total_subscriptions(conn)
            conn.commit()
            with counting(err, "replaying", "subscriptions") as bar:
                task = bar.add_task("", total=total or None)
                report = run_replay(conn, services.policy, services.clock(), dry_run=dry_run,
                                    progress=lambda n: bar.advance(task, n))
        else:
            report = run_replay(conn, services.policy, services.clock(), subscription=subscription,
                                dry_run=dry_run)
        if report.messages and not dry_run:
            wake_relay(conn)
    if subscription is not None and report.subscriptions == 0:
        err.print(f"error: the log holds no facts for subscription {subscription!r}", highlight=False)
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(report.as_json()))
        return
    verb = "would change" if dry_run else "changed"
    out.print(
        f"replayed {plural(report.subscriptions, 'subscription')}; {verb}: {plural(report.states, 'projection')}, "
        f"{plural(report.transitions, 'new transition')}, {report.superseded} superseded, {report.revived} revived, "
        f"{plural(report.messages, 'new message')}",
        highlight=False,
    )
    for change in report.changes:
        for line in change.lines():
            out.print(("would " if dry_run else "") + line, highlight=False, markup=False)
    if report.changed > len(report.changes):
        out.print(f"... and {plural(report.changed - len(report.changes), 'more subscription')}", highlight=False)


def verify(
    as_json: JsonOption = False,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Walk the hash chain and compare every projection with a fresh fold; exit 1 naming the first bad entry."""
    with connection(config, database_url) as (services, conn):
        started = services.clock()
        if sys.stderr.isatty() and not as_json:
            entries, projections = sizes(conn)
            with counting(err, "verifying", "log entries") as bar:
                # The chain walk, then the projection walk: each advances its own task.
                tasks = {"chain": bar.add_task("chain", total=entries or None),
                         "projections": bar.add_task("projections", total=projections or None,
                                                     unit="subscriptions", start=False)}

                def advance(stage: str, n: int) -> None:
                    bar.start_task(tasks[stage])  # a stage's clock starts with its first step
                    bar.advance(tasks[stage], n)

                result = run_verify(conn, progress=advance)
        else:
            result = run_verify(conn)
        unrecorded = verify_runs.record(conn, verify_runs.VerifyRun(  # shown on the console's overview
            services.clock(), started, result.ok, result.entries, result.subscriptions, result.problem_count,
            result.first_bad_position))
    if unrecorded:
        err.print(f"warning: the result was not recorded for the console: {unrecorded}", highlight=False,
                  markup=False)
    if as_json:
        print(json.dumps(result.as_json()))
    elif result.ok:
        each = "equals" if result.subscriptions == 1 else "equal"
        out.print(f"ok: {plural(result.entries, 'log entry', 'log entries')} chain correctly; "
                  f"{plural(result.subscriptions, 'subscription')} {each} a fresh fold of the log", highlight=False)
    else:
        first = result.first_bad_position
        if first is not None:
            err.print(f"error: the log is broken at position {first}", highlight=False)
        for problem in result.problems:
            err.print(f"  {problem.describe()}", highlight=False, markup=False)
        if result.problem_count > len(result.problems):
            err.print(f"  ... and {result.problem_count - len(result.problems)} more", highlight=False)
    if not result.ok:
        raise typer.Exit(1)
