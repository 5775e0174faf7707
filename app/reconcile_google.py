"""Google Play reconciliation: voided purchases, and a bounded sweep of live subscriptions whose period ended.

RTDN pushes lost on the way (a deleted Pub/Sub subscription, an endpoint refusing for longer than the
message retention) are recovered two ways, each logged as the push it stands for
(core/sources/google.py `voided_body` / `sweep_body`), mapped by the push path's own mapping, with
the fetched state kept in the log exactly as the push path keeps it (`google_fetched`), so the fold
and `subledger replay` never call Google:

* `purchases.voidedpurchases.list` (`type=1`: subscriptions too), the last 30 days at most, from the
  app's "google/voided" cursor less a day: every refunded, revoked or charged-back order the log
  holds no refund for, of a subscription the log knows, becomes that refund (or, when Google's state
  shows access ended with it, the revocation: refund and expiration). Each costs `subscriptionsv2.get`
  and `orders.get`, as a push does; voided one-time products (and tokens the log never heard of) cost
  no call.
* The sweep: at most `sweep_limit` subscriptions the projection says are live whose period ended
  more than `sweep_margin_minutes` ago (and less than 60 days ago: Google no longer answers for
  tokens expired longer) with nothing heard since, oldest first (store/play_reconciliation.py).
  Their state is fetched (`subscriptionsv2.get`, plus `orders.get` for a renewal's money) and what
  it says beyond the projection (renewed, expired, on hold, paused) is logged; "still active, not
  renewed yet" logs nothing.

Nothing is written until every page and every fetch of the run succeeded: a run Google stops
(after PlayApi's retries, and `resumes` pauses on top for a 429 / 5xx) leaves the log and the cursor
as they were. The facts are then ingested in one batch, oldest first, with `arrival =
reconciliation`: the gap report (`subledger_reconciliation_recovered_total`, the warning line) counts them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

import psycopg

from subledger.app.google_api import GoogleLinks, GoogleSource, PlayApi
from subledger.app.reconcile import Summary, ingest_recovered
from subledger.app.sources import Sources
from subledger.core.errors import PayloadRejected, SourceUnavailable, UnknownApp
from subledger.core.events import Source, Store, stream_key
from subledger.core.lifecycle import SubscriptionState
from subledger.core.sources import google as google_source
from subledger.outbox.ingest import Incoming, IngestPolicy
from subledger.store import play_reconciliation as play_rows
from subledger.store import reconciliation as rows

log = logging.getLogger("subledger.reconcile")

SOURCE: Final = Source.GOOGLE.value
VOIDED_CURSOR: Final = "google/voided"
SWEEP_CURSOR: Final = "google/sweep"
# Google lists voided purchases seen in the last 30 days; a startTime older is refused, so stay inside.
VOIDED_WINDOW: Final = timedelta(days=30) - timedelta(minutes=5)
# A run re-reads a day before the cursor: the window is Google's time of seeing a void, which can lag.
OVERLAP: Final = timedelta(days=1)
# subscriptionsv2.get cannot be asked about a token more than 60 days after it expired.
SWEEP_HORIZON: Final = timedelta(days=60)
PAGE_SIZE: Final = 1000  # Google's maximum maxResults
# Beyond PlayApi's own quick retries: a 429 means the per-minute quota, so pause, then resume the call.
RESUMES: Final = 3
RESUME_PAUSE_SECONDS: Final = 30.0

T = TypeVar("T")
Progress = Callable[[str, int, int | None], None]  # (stage, done so far, total when known)


@dataclass
class GoogleSummary(Summary):
    """`Summary` plus the sweep's counts; `listed` counts voided purchases, `pages` their pages."""

    swept: int = 0  # subscriptions whose state the sweep fetched
    unchanged: int = 0  # of which Google said nothing beyond the projection
    gone: int = 0  # Google answered 404/410 (a token unknown, or expired too long ago)
    skipped: int = 0  # voided purchases of tokens the log knows no subscription for (one-time products)
    resumed: int = 0  # pauses after PlayApi's retries gave up (429 / 5xx), each followed by a retry

    def as_json(self) -> dict[str, Any]:
        out = super().as_json()
        out.update(swept=self.swept, unchanged=self.unchanged, gone=self.gone, skipped=self.skipped,
                   resumed=self.resumed)
        return out


def source_for(sources: Sources, app_id: str) -> GoogleSource:
    """The app's Play adapter (Sources keys them by package name); UnknownApp when it has none."""
    for adapter in sources.google.values():
        if adapter.config.app_id == app_id:
            return adapter
    raise UnknownApp(f'app {app_id!r} has no Google Play source configured (add [apps."{app_id}".google])', "app_id")


def window_start(
    conn: psycopg.Connection, app_id: str, now: datetime, since: datetime | None, all_types: bool
) -> datetime:
    """`since` when given, else (unless `all_types`: the whole window) the cursor less the overlap;
    never older than Google's 30 days."""
    earliest = now - VOIDED_WINDOW
    if since is None and not all_types:
        at = rows.cursor(conn, VOIDED_CURSOR, app_id)
        since = None if at is None else at - OVERLAP
    return earliest if since is None else max(since, earliest)


class _Run:
    """One run's state: the adapter bound to the run's API client, the summary, what to ingest."""

    def __init__(self, adapter: GoogleSource, api: PlayApi, summary: GoogleSummary, links: GoogleLinks,
                 progress: Progress | None, sleep: Callable[[float], None], pause: float, resumes: int) -> None:
        self.adapter = dataclasses.replace(adapter, api=api)  # the push path's fetch, through this client
        self.api = api
        self.package = adapter.config.package_name
        self.summary = summary
        self.links = links
        self.progress = progress
        self.sleep = sleep
        self.pause = pause
        self.resumes = resumes
        self.items: list[Incoming] = []
        self.ids: set[str] = set()

    def call(self, attempt: Callable[[], T]) -> T:
        """`attempt`, resumed after a pause when PlayApi gave up on a 429/5xx (at most `resumes` per run)."""
        while True:
            try:
                return attempt()
            except SourceUnavailable:
                if self.summary.resumed >= self.resumes:
                    raise
                self.summary.resumed += 1
                log.info("reconcile google %s: the Play Developer API is throttling or failing; resuming in %.0f s",
                         self.summary.app_id, self.pause)
                self.sleep(self.pause)

    def tell(self, stage: str, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def keep(self, raw: bytes, fetched: google_source.Fetched) -> None:
        """Map `raw` (a push body reconciliation built) with what was fetched, as the push path does."""
        push = google_source.parse_push(raw)
        if push.external_id in self.ids:
            self.summary.duplicates += 1
            return
        try:
            notification = google_source.map_push(push, fetched, self.adapter.config, chain=self.links)
        except PayloadRejected as exc:
            self.summary.refused += 1
            self.summary.refused_ids.append(push.external_id)
            log.warning("reconcile google %s: %s refused: %s", self.summary.app_id, push.kind, exc)
            return
        self.links.remember(notification)
        self.ids.add(push.external_id)
        self.items.append(Incoming(notification, raw, arrival=rows.RECONCILIATION))

    # -- voided purchases --

    def list_voided(self, start: datetime, end: datetime) -> list[google_source.Voided]:
        listed: dict[tuple[str, datetime], google_source.Voided] = {}
        asked: str | None = None
        while True:
            page = self._voided_page(start, end, asked)
            self.summary.pages += 1
            items = page.get("voidedPurchases", [])
            if not isinstance(items, list):
                raise SourceUnavailable("the Play Developer API's voidedpurchases.list answer is not a list")
            for item in items:
                try:
                    voided = google_source.parse_voided(item)
                except PayloadRejected as exc:
                    self.summary.refused += 1
                    log.warning("reconcile google %s: a voided purchase refused: %s", self.summary.app_id, exc)
                    continue
                listed.setdefault((voided.order_id, voided.voided_at), voided)
            self.tell("voided purchases", len(listed), None)
            following = page.get("tokenPagination")
            token = following.get("nextPageToken") if isinstance(following, dict) else None
            if not isinstance(token, str) or not token or token == asked:
                break
            asked = token
        return sorted(listed.values(), key=lambda v: (v.voided_at, v.order_id))

    def _voided_page(self, start: datetime, end: datetime, token: str | None) -> dict[str, Any]:
        page = self.call(lambda: self.api.voided_purchases(self.package, start, end, token, PAGE_SIZE))
        if isinstance(page, google_source.Failure):
            raise SourceUnavailable(f"the Play Developer API answered {page.status} to voidedpurchases.list: "
                                    f"{page.reason}")
        return page

    def recover_voided(self, voided: list[google_source.Voided], refunded: set[str]) -> None:
        for done, item in enumerate(voided, 1):
            if item.order_id in refunded:
                self.summary.duplicates += 1  # its push (or a revocation's) was logged
            elif item.purchase_token not in self.links.seen:
                # a one-time product, or a subscription never heard of: no stream to state a refund on,
                # and no call spent on it at every run while it stays in the window
                self.summary.skipped += 1
            else:
                probe = google_source.voided_probe(self.package, item)
                fetched = self.call(lambda: self.adapter.fetch(probe))  # noqa: B023 (called at once)
                if fetched.failure is not None or fetched.subscription is None:
                    self.summary.gone += 1  # a token Google no longer serves
                else:
                    self.keep(google_source.voided_body(self.package, item, fetched.subscription), fetched)
            self.tell("voided purchases", done, len(voided))

    # -- the sweep --

    def sweep(self, candidates: list[play_rows.Candidate]) -> None:
        for done, candidate in enumerate(candidates, 1):
            self.tell("sweep", done - 1, len(candidates))
            state = SubscriptionState.from_json(candidate.state)
            got = self.call(lambda: self.api.subscription(self.package, candidate.token))  # noqa: B023
            self.summary.swept += 1
            if isinstance(got, google_source.Failure):
                self.summary.gone += 1
                continue
            raw = google_source.sweep_body(self.package, candidate.token, got, known_expiry=candidate.expires_at,
                                           billing_issue=state.billing_issue)
            if raw is None:
                self.summary.unchanged += 1
                continue
            push = google_source.parse_push(raw)
            fetched = self.call(lambda: self.adapter.fetched_with(push, got))  # noqa: B023
            self.keep(raw, fetched)
        self.tell("sweep", len(candidates), len(candidates))


def reconcile_google(
    conn: psycopg.Connection,
    sources: Sources,
    api: PlayApi,
    app_id: str,
    policy: IngestPolicy,
    now: datetime,
    *,
    since: datetime | None = None,
    all_types: bool = False,
    dry_run: bool = False,
    sweep_limit: int | None = None,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    pause: float = RESUME_PAUSE_SECONDS,
    resumes: int = RESUMES,
) -> GoogleSummary:
    """Recover the app's voided purchases and sweep its live-but-ended subscriptions; ingest what the
    log lacks (oldest first) and advance the cursors. `all_types`: the whole 30-day voided window, not
    only since the cursor (the daily run). `sweep_limit`: the app's `sweep_limit` unless given (0: no sweep).
    """
    adapter = source_for(sources, app_id)  # UnknownApp when the app has no Play source
    settings = adapter.settings
    limit = settings.sweep_limit if sweep_limit is None else sweep_limit
    start = window_start(conn, app_id, now, since, all_types)
    conn.commit()  # no transaction held open while Google is asked
    summary = GoogleSummary(app_id, SOURCE, "all" if all_types else "recent", start, dry_run)
    run = _Run(adapter, api, summary, GoogleLinks(conn, app_id), progress, sleep, pause, resumes)
    requests, throttled = api.requests, api.throttled
    try:
        voided = run.list_voided(start, now)
        summary.listed = len(voided)
        refunded = play_rows.refunded_orders(conn, app_id, sorted({v.order_id for v in voided}))
        # the chain lookup's answers for the run's tokens, read at once (the mapping asks it per token)
        run.links.seen.update(play_rows.token_subscriptions(conn, app_id, sorted({v.purchase_token for v in voided})))
        prefix = stream_key(app_id, Store.PLAY_STORE, "")
        candidates = play_rows.sweep_candidates(
            conn, app_id, prefix,
            ended_before=now - timedelta(minutes=settings.sweep_margin_minutes),
            not_before=now - SWEEP_HORIZON, limit=limit,
        )
        conn.commit()
        for candidate in candidates:  # a swept token's chain root is its subscription's id: no lookup
            run.links.seen.setdefault(candidate.token, candidate.key.removeprefix(prefix))
        run.recover_voided(voided, refunded)
        run.sweep(candidates)
    finally:
        summary.api_calls, summary.throttled = api.requests - requests, api.throttled - throttled
    known = rows.logged(conn, SOURCE, sorted(run.ids))
    conn.commit()
    items = sorted((i for i in run.items if i.notification.external_id not in known), key=_when)
    summary.duplicates += len(run.items) - len(items)
    if ingest_recovered(conn, summary, items, policy, now, "check the Pub/Sub push subscription (endpoint, "
                        "authentication) and the RTDN topic in Play Console"):
        with conn.transaction():
            rows.advance(conn, VOIDED_CURSOR, app_id, now, now)
            rows.advance(conn, SWEEP_CURSOR, app_id, now, now)
    return summary


def _when(item: Incoming) -> tuple[datetime, str]:
    events = item.notification.events
    first = min((e.occurred_at for e in events), default=datetime.max.replace(tzinfo=UTC))
    return first, item.notification.external_id
