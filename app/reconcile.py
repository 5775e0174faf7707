"""Reconciliation: ask a store's API what happened, and log what push never delivered.

A store that fails to deliver a webhook (a wrong URL, a rotated secret, an outage longer than its
retries) loses facts silently. A reconciler lists what the store's API says happened in a window,
keeps what the log does not hold (by the same external id a webhook would carry), and ingests it
with `arrival = reconciliation`: published when younger than `reconciliation_publish_days`
(outbox/ingest._horizon), history beyond. What it recovered is the gap report: a warning line
here, and `subledger_reconciliation_recovered_total{app_id,source}` at /metrics (read from the log).

Each store's reconciler has `reconcile_stripe`'s signature and returns a `Summary`; the registry
that runs them (CLI, scheduled jobs, `reconcile status`) is app/reconcile_schedule.py. Each mode
keeps its own cursor (`cursor_name`: "stripe/failures", "stripe/all"). Stripe's mapping is the
webhook adapter's; its I/O is app/stripe_api.py; rows are store/reconciliation.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import psycopg

from subledger.app.sources import Sources, StripeLinks
from subledger.app.stripe_api import StripeEvents
from subledger.core.errors import PayloadRejected
from subledger.core.events import format_time
from subledger.core.sources import stripe as stripe_source
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.store import reconciliation as rows

log = logging.getLogger("subledger.reconcile")

SOURCE: Final = "stripe"
# The two run modes: the frequent run reads what the store says failed to reach us, the daily run
# reads everything (it also catches an endpoint that was deleted or never subscribed to a type).
FAILURES: Final = "failures"
ALL: Final = "all"
# Stripe keeps events for 30 days: a window never reaches further back.
STRIPE_WINDOW: Final = timedelta(days=30)
# A run re-reads this much before the last completed run's cursor: Stripe marks a delivery failed
# only after its attempts (live mode retries for up to 3 days), so a failure can appear late.
OVERLAP: Final = timedelta(days=3)


@dataclass
class Summary:
    """What one run did; `as_json` is the `--json` output."""

    app_id: str
    source: str
    mode: str  # failures (delivery_success=false) or all
    since: datetime
    dry_run: bool
    listed: int = 0
    recovered: int = 0
    duplicates: int = 0
    refused: int = 0
    pages: int = 0
    api_calls: int = 0
    throttled: int = 0
    recovered_ids: list[str] = field(default_factory=list)
    refused_ids: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id, "source": self.source, "mode": self.mode, "since": format_time(self.since),
            "dry_run": self.dry_run, "listed": self.listed, "recovered": self.recovered,
            "duplicates": self.duplicates, "refused": self.refused, "pages": self.pages,
            "api_calls": self.api_calls, "throttled": self.throttled, "recovered_ids": self.recovered_ids,
            "refused_ids": self.refused_ids,
        }


def cursor_name(source: str, all_types: bool) -> str:
    """The cursor of one store's mode, e.g. "stripe/failures" and "stripe/all": each mode resumes from
    its own last complete read (a frequent failures-only run must not move the daily run's start)."""
    return f"{source}/{ALL if all_types else FAILURES}"


def warn_recovered(summary: Summary, check: str) -> None:
    """The gap report's log line, one per run that recovered anything (every store's reconciler calls
    it): the push channel lost facts, and `check` says where to look."""
    if summary.recovered and not summary.dry_run:
        log.warning("reconciliation recovered %d %s event(s) for app %s that push never delivered: %s",
                    summary.recovered, summary.source, summary.app_id, check)


def ingest_recovered(conn: psycopg.Connection, summary: Summary, items: list[Incoming], policy: IngestPolicy,
                     now: datetime, check: str) -> bool:
    """Every store's last step: ingest `items` into the log and count them into `summary` (a dry run
    only counts them), then the gap report's line. False for a dry run: the caller keeps its cursors."""
    if summary.dry_run:
        summary.recovered = len(items)
        summary.recovered_ids = [i.notification.external_id for i in items]
        return False
    if items:
        for outcome in ingest(conn, items, policy, now):
            if outcome.result == "new":
                summary.recovered += 1
                summary.recovered_ids.append(outcome.external_id)
            else:  # a webhook (or another run) logged it meanwhile
                summary.duplicates += 1
    warn_recovered(summary, check)
    return True


def window_start(conn: psycopg.Connection, app_id: str, now: datetime, since: datetime | None,
                 *, all_types: bool = False) -> datetime:
    """`since` when given, else the mode's cursor less the overlap, else Stripe's whole window; never older."""
    earliest = now - STRIPE_WINDOW
    if since is None:
        at = rows.cursor(conn, cursor_name(SOURCE, all_types), app_id)
        since = earliest if at is None else at - OVERLAP
    return max(since, earliest)


def reconcile_stripe(
    conn: psycopg.Connection,
    sources: Sources,
    api: StripeEvents,
    app_id: str,
    policy: IngestPolicy,
    now: datetime,
    *,
    since: datetime | None = None,
    all_types: bool = False,
    dry_run: bool = False,
) -> Summary:
    """List the window's events, ingest those the log lacks (oldest first), advance the mode's cursor.

    Nothing is written until every page was read, so a run stopped by the API (after its retries)
    leaves the log and the cursor as they were and the next run reads the same window again.
    """
    config = sources.stripe_for(app_id)  # UnknownApp when the app has no Stripe endpoint
    start = window_start(conn, app_id, now, since, all_types=all_types)
    conn.commit()  # no transaction held open while the API is read
    summary = Summary(app_id, SOURCE, "all" if all_types else "failures", start, dry_run)
    listed: dict[str, dict[str, Any]] = {}
    try:
        for page in api.pages(start, failures_only=not all_types):
            for event in page.events:
                listed.setdefault(event["id"], event)
    finally:
        summary.pages, summary.api_calls, summary.throttled = api.calls.pages, api.calls.requests, api.calls.throttled
    summary.listed = len(listed)
    known = rows.logged(conn, SOURCE, sorted(listed))
    summary.duplicates = len(known)
    missing = sorted((e for i, e in listed.items() if i not in known), key=lambda e: (e["created"], e["id"]))
    links = StripeLinks(conn, app_id)
    items: list[Incoming] = []
    for event in missing:
        raw = stripe_source.recovered_body(event)
        try:
            notification = stripe_source.parse_unverified(raw, config, subscription_for=links)
        except PayloadRejected as exc:
            summary.refused += 1
            summary.refused_ids.append(event["id"])
            log.warning("reconcile stripe %s: event %s refused: %s", app_id, event["id"], exc)
            continue
        links.remember(notification, raw)
        items.append(Incoming(notification, raw, arrival=rows.RECONCILIATION))
    conn.commit()
    if ingest_recovered(conn, summary, items, policy, now,
                        "check the webhook endpoint's URL and signing secret in the Stripe dashboard"):
        with conn.transaction():
            rows.advance(conn, cursor_name(SOURCE, all_types), app_id, now, now)
    return summary
