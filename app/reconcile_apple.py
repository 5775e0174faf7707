"""Apple reconciliation: read the App Store's notification history, log what push never delivered.

Two modes, each with its own cursor per app (store/reconciliation.py):

* frequent (`failures`, cursor "apple/failures"): `onlyFailures` over the last 72 h (Apple retries a
  V2 notification at 1, 12, 24, 48 and 72 h; sandbox once), from the cursor less 72 h when the last
  run is older than that;
* daily (`all`, cursor "apple/all"): every notification, from the cursor less 72 h, at most
  `history_days` back (default 30; Apple keeps 180), which also catches a notification Apple counts
  as delivered that never reached the log (an endpoint that answered 200 but was not subledger).

Each record's `signedPayload` is what the webhook carried, so it is mapped by the webhook adapter
(verified against the configured roots, external id = notificationUUID): a notification whose
webhook did arrive is a duplicate. The missing ones are ingested oldest first with `arrival =
reconciliation`. Nothing is written until every page of every environment was read.

`refresh_subscription` (`subledger reconcile apple --subscription`) asks one subscription's statuses
and transaction history instead; the mapping is core/sources/apple_recovery.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Final

import psycopg
from appstoreserverlibrary.models.JWSRenewalInfoDecodedPayload import JWSRenewalInfoDecodedPayload
from appstoreserverlibrary.models.JWSTransactionDecodedPayload import JWSTransactionDecodedPayload
from appstoreserverlibrary.models.StatusResponse import StatusResponse

from subledger.app.apple_api import HISTORY_LIMIT, AppleApi
from subledger.app.reconcile import Summary, ingest_recovered
from subledger.app.sources import Sources
from subledger.core.errors import InvalidEvent, PayloadRejected, UnknownApp
from subledger.core.sources import apple as apple_source
from subledger.outbox.ingest import Incoming, IngestPolicy
from subledger.store import log as log_rows
from subledger.store import reconciliation as rows

log = logging.getLogger("subledger.reconcile")

SOURCE: Final = "apple"
FAILURES_CURSOR: Final = "apple/failures"
ALL_CURSOR: Final = "apple/all"
# Apple retries a notification for 72 h: the frequent run reads at least that far back, and every
# run re-reads this much before its cursor (a notification still being retried is listed late).
RETRY_SPAN: Final = timedelta(hours=72)
# Apple refuses a startDate older than 180 days; keep clear of that edge (clocks differ).
EDGE: Final = timedelta(minutes=10)
CHECK: Final = ("check the App Store Server Notifications V2 URL in App Store Connect (App Information) and "
                "that it answers 200")


def adapter_for(sources: Sources, app_id: str) -> apple_source.AppleAdapter:
    """The app's Apple adapter (Sources keys them by bundle id); UnknownApp when it has none."""
    for adapter in sources.apple.values():
        if adapter.config.app_id == app_id:
            return adapter
    raise UnknownApp(f'app {app_id!r} has no App Store configuration (add [apps."{app_id}".apple])', "app_id")


def window_start(conn: psycopg.Connection, app_id: str, api: AppleApi, now: datetime, since: datetime | None,
                 *, all_types: bool) -> datetime:
    """`since` when given; else the mode's cursor less 72 h (the frequent run: at least the last 72 h;
    the daily run: `history_days` on its first run); never beyond `history_days` nor Apple's 180."""
    limit = now - HISTORY_LIMIT + EDGE
    if since is not None:
        return max(since, limit)
    reach = now - api.window
    at = rows.cursor(conn, ALL_CURSOR if all_types else FAILURES_CURSOR, app_id)
    resumed = None if at is None else max(at - RETRY_SPAN, reach)
    if all_types:
        start = reach if resumed is None else resumed
    else:
        start = now - RETRY_SPAN if resumed is None else min(now - RETRY_SPAN, resumed)
    return max(start, limit)


def reconcile_apple(
    conn: psycopg.Connection,
    sources: Sources,
    api: AppleApi,
    app_id: str,
    policy: IngestPolicy,
    now: datetime,
    *,
    since: datetime | None = None,
    all_types: bool = False,
    dry_run: bool = False,
) -> Summary:
    """Read the window's notification history, ingest what the log lacks (oldest first), advance the
    mode's cursor. A run stopped by the API (after its retries) writes nothing."""
    adapter = adapter_for(sources, app_id)
    api.bundle_id = api.bundle_id or adapter.config.bundle_id
    start = window_start(conn, app_id, api, now, since, all_types=all_types)
    conn.commit()  # no transaction held open while the API is read
    summary = Summary(app_id, SOURCE, "all" if all_types else "failures", start, dry_run)
    found: dict[str, apple_source.Listed] = {}
    with _counted(api, summary):
        for page in api.notification_pages(start, now, failures_only=not all_types):
            for signed in page.signed_payloads:
                record = apple_source.listed(signed)
                found.setdefault(record.notification_uuid, record)
    summary.listed = len(found)
    known = rows.logged(conn, SOURCE, sorted(found))
    conn.commit()
    summary.duplicates = len(known)
    missing = sorted((r for u, r in found.items() if u not in known),
                     key=lambda r: (r.signed_date, r.notification_uuid))
    items: list[Incoming] = []
    for record in missing:
        raw = apple_source.recovered_body(record.signed_payload)
        try:
            notification = adapter.parse(raw)
        except PayloadRejected as exc:
            summary.refused += 1
            summary.refused_ids.append(record.notification_uuid)
            log.warning("reconcile apple %s: notification %s refused: %s", app_id, record.notification_uuid, exc)
            continue
        items.append(Incoming(notification, raw, arrival=rows.RECONCILIATION))
    if ingest_recovered(conn, summary, items, policy, now, CHECK):
        with conn.transaction():
            rows.advance(conn, ALL_CURSOR if all_types else FAILURES_CURSOR, app_id, now, now)
    return summary


def refresh_subscription(
    conn: psycopg.Connection,
    sources: Sources,
    api: AppleApi,
    app_id: str,
    policy: IngestPolicy,
    now: datetime,
    transaction_id: str,
    *,
    dry_run: bool = False,
) -> Summary:
    """Ask Apple for one subscription's statuses and transaction history (V2), ingest the facts the
    log lacks (core/sources/apple.py `recover_subscription` says which, and their ids). No cursor.

    `transaction_id` is the subscription's original transaction id, or any of its transactions'.
    `listed` counts the signed transactions read; `duplicates` those whose charge was logged.
    """
    adapter = adapter_for(sources, app_id)
    api.bundle_id = api.bundle_id or adapter.config.bundle_id
    conn.commit()
    summary = Summary(app_id, SOURCE, "subscription", now, dry_run)
    with _counted(api, summary):
        found = api.subscription(transaction_id)
    if found is None:
        raise InvalidEvent(f"Apple knows no transaction {transaction_id!r} of this app in "
                           f"{' or '.join(api.environments)}", "--subscription")
    environment, statuses, signed = found
    verified: list[tuple[str, JWSTransactionDecodedPayload]] = []
    for jws in signed:
        try:
            verified.append((jws, adapter.verified_transaction(environment, jws)))
        except PayloadRejected as exc:
            summary.refused += 1
            log.warning("reconcile apple %s: a signed transaction refused: %s", app_id, exc)
    original = next((t.originalTransactionId for _, t in verified if t.transactionId == transaction_id), None)
    original = original or transaction_id
    mine = [(jws, t) for jws, t in verified if t.originalTransactionId == original]
    status, renewal, signed_renewal = _status_of(adapter, environment, statuses, original, summary)
    summary.listed = len(mine)
    logged = [located.event for located in log_rows.history(conn, apple_source.stream_key(app_id, original))]
    conn.commit()
    recovered = apple_source.recover_subscription(
        adapter.config, environment, [t for _, t in mine], logged,
        signed_transactions={str(t.transactionId): jws for jws, t in mine},
        status=status, renewal=renewal, signed_renewal=signed_renewal)
    charges = sum(1 for r in recovered if r.notification.external_id.startswith("-transaction:"))
    summary.duplicates = len(mine) - charges
    items = [Incoming(r.notification, r.raw, arrival=rows.RECONCILIATION) for r in recovered]
    ingest_recovered(conn, summary, items, policy, now, CHECK)
    return summary


def _status_of(adapter: apple_source.AppleAdapter, environment: str, statuses: StatusResponse, original: str,
               summary: Summary) -> tuple[int | None, JWSRenewalInfoDecodedPayload | None, str | None]:
    """The subscription's status (1 active ... 5 revoked) and verified renewal info, from its statuses."""
    for group in statuses.data or []:
        for item in group.lastTransactions or []:
            if item.originalTransactionId != original:
                continue
            renewal = None
            if item.signedRenewalInfo:
                try:
                    renewal = adapter.verified_renewal(environment, item.signedRenewalInfo)
                except PayloadRejected as exc:
                    summary.refused += 1
                    log.warning("reconcile apple %s: a signed renewal info refused: %s", summary.app_id, exc)
            return item.rawStatus, renewal, item.signedRenewalInfo
    return None, None, None


@contextmanager
def _counted(api: AppleApi, summary: Summary) -> Iterator[None]:
    """Count into `summary` what the API was asked meanwhile (one client may serve several runs)."""
    pages, requests, throttled = api.calls.pages, api.calls.requests, api.calls.throttled
    try:
        yield
    finally:
        summary.pages = api.calls.pages - pages
        summary.api_calls = api.calls.requests - requests
        summary.throttled = api.calls.throttled - throttled

