"""The outbox relay: claim due rows, POST them to their destination, record the outcome.

Why it is shaped this way (segment.md "Relay mechanics", eventstore-outbox.md §4):

- No transaction is open across HTTP. A claim is one short transaction (`FOR UPDATE SKIP LOCKED`,
  then a lease: `lease_until`, `lease_owner`); the outcome is another. A relay killed between the
  two leaves leased rows that become claimable again when the lease runs out, and the resend
  carries the same messageId, which Segment, RudderStack (dedup on) and Jitsu drop.
- Claims are by row state, never by a cursor, so sequence gaps and late commits cannot hide a row.
- A row is delivered only after a 2xx: in one transaction it leaves `outbox` and lands in
  `outbox_delivered`, so the hot table stays small. Every request is recorded in `outbox_attempts`.
- Per subscriber order: a row is not claimable while an earlier (lower id) pending row of the same
  (app_id, destination, subscriber) exists, whether leased, waiting for a retry or not yet tried.
  Dead rows do not block.
- Outcomes other than a 2xx are recorded only by the lease holder (fencing): a relay whose lease
  ran out cannot overwrite what another relay decided. A 2xx is recorded by anyone: it is a fact.
- Short leases, renewed: a claim holds its rows for `lease` (10 s), and while the relay works on
  them (a slow request, a bisection) a heartbeat thread renews the lease every third of it. A
  killed relay's rows therefore come back within about 10 s, not after the longest request could
  take, and per-subscriber order stalls the rows behind them only that long. The holder id
  (host:pid:random) is stored in `lease_owner` and shown by `outbox list` and the audit timeline.
- Back off the destination, not the rows, while it fails: a 5xx, timeout or refused connection
  marks the destination failing (`destination_state.failing_since`); its backlog is then held and
  one small probe (one row) is sent at the destination's backoff (1 s doubling, capped at 5 s),
  never advancing the probed row's own backoff. The first answer releases the whole backlog at
  once, because no row's own backoff grew during the outage. One line is logged when an outage
  starts and one when it ends (duration, backlog). Rows of the request that failed first keep the
  per-row backoff, so a row whose content makes the endpoint answer 500 backs off alone: probes
  prefer the least recently tried row, so it cannot keep the destination failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from subledger.core.delivery import (
    PROBE_CAP_SECONDS,
    Backoff,
    Delivered,
    Paused,
    Poisoned,
    RetryAt,
    Verdict,
    classify,
    destination_failed,
    excerpt,
    halves,
    next_probe,
    plan,
)
from subledger.core.errors import StoreError
from subledger.outbox import metrics
from subledger.outbox.segment import Response, SegmentClient, oversize_verdict
from subledger.store.db import connect

log = logging.getLogger("subledger.relay")

DEDUP_WINDOW = timedelta(hours=24)
"""Segment keeps at least 24 h of messageIds; a resend after that may be a duplicate downstream."""

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one (app, destination) sends: endpoint, keys and transport options."""

    app_id: str
    destination: str
    endpoint: str
    write_key: str
    sandbox_write_key: str | None = None
    gzip: bool = False
    timeout_seconds: float = 15.0

    def key_for(self, sandbox: bool) -> str:
        return self.sandbox_write_key if sandbox and self.sandbox_write_key else self.write_key

    def fingerprint(self) -> str:
        """Changes when the endpoint or a key changes: a paused destination resumes on a config change."""
        material = "\x1f".join((self.endpoint, self.write_key, self.sandbox_write_key or ""))
        return hashlib.sha256(material.encode()).hexdigest()[:16]


def routes_from(apps: Mapping[str, Any]) -> dict[tuple[str, str], Route]:
    """Routes from `Settings.apps` (duck-typed: outbox must not import the app layer)."""
    out: dict[tuple[str, str], Route] = {}
    for app_id, app in apps.items():
        for name, d in app.destinations.items():
            out[(app_id, name)] = Route(
                app_id=app_id,
                destination=name,
                endpoint=d.endpoint,
                write_key=d.write_key,
                sandbox_write_key=d.sandbox_write_key,
                gzip=d.gzip,
                timeout_seconds=d.timeout_seconds,
            )
    return out


MIN_LEASE = timedelta(seconds=1)
_FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class RelayConfig:
    batch_rows: int = 1000
    """Rows claimed per pass (each row is a track + an identify)."""
    lease: timedelta = timedelta(seconds=10)
    """How long claimed rows are ours without a renewal: the longest a killed relay holds them.
    A live relay renews it every third of it while it works, however long a request takes."""
    backoff: Backoff = field(default_factory=Backoff)
    """Per row, after a request that failed while its destination looked healthy."""
    owner: str = field(default_factory=default_owner)
    max_batch_bytes: int | None = None
    max_batch_events: int | None = None
    probe_cap_seconds: float = PROBE_CAP_SECONDS
    """The destination's backoff is `backoff` capped at this: probes stay frequent, and cheap."""
    probe_rows: int = 1
    """Rows in a probe of a failing destination: one small request."""

    @property
    def destination_backoff(self) -> Backoff:
        return Backoff(self.backoff.base_seconds, min(self.backoff.cap_seconds, self.probe_cap_seconds))


@dataclass(slots=True)
class Row:
    """A claimed outbox row: its stored messages as the exact bytes to send."""

    id: int
    message_id: str
    app_id: str
    destination: str
    subscriber: str
    messages: tuple[bytes, ...]
    message_ids: tuple[str, ...]
    sandbox: bool
    attempts: int
    first_attempt_at: datetime | None
    created_at: datetime
    tries: int = 0


@dataclass
class PassStats:
    claimed: int = 0
    delivered: int = 0
    dead: int = 0
    retried: int = 0
    released: int = 0
    requests: int = 0

    def add(self, other: PassStats) -> None:
        for name in ("claimed", "delivered", "dead", "retried", "released", "requests"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Outcome:
    """What a batch came to, recorded in one short transaction."""

    delivered: list[Row] = field(default_factory=list)
    delivered_status: int = 200
    dead: list[tuple[Row, int | None, str]] = field(default_factory=list)
    retry: list[tuple[Row, datetime, int | None, str]] = field(default_factory=list)
    release: list[Row] = field(default_factory=list)
    attempts: list[tuple[str, datetime, int | None, str, str]] = field(default_factory=list)
    pause: tuple[int, str] | None = None
    wait_until: datetime | None = None
    probe: bool = False
    """The request probed a failing destination: a failure is the destination's, not the rows'."""
    failure: tuple[str, datetime] | None = None
    """The destination failed (reason, the time it asked to wait until): back it off."""
    answered: datetime | None = None
    """When the request the destination answered (anything but a failure) was sent: it is up. A
    request sent before an outage started (by another relay) says nothing about its end."""
    started_failing: int | None = None
    recovered: tuple[float, int, int] | None = None
    """After `_record`: the outage (seconds, failed requests) and the backlog it left."""


CLAIM = """
WITH routes(app_id, destination) AS (
  SELECT * FROM unnest(%(apps)s::text[], %(dests)s::text[])
), candidates AS (
  SELECT o.id FROM outbox o
  JOIN routes r ON r.app_id = o.app_id AND r.destination = o.destination
  WHERE o.status = 'pending' AND o.available_at <= %(now)s
    AND (o.lease_until IS NULL OR o.lease_until < %(now)s)
    AND NOT EXISTS (
      SELECT 1 FROM outbox p
      WHERE p.status = 'pending' AND p.app_id = o.app_id AND p.destination = o.destination
        AND p.subscriber = o.subscriber AND p.id < o.id)
    AND NOT EXISTS (
      SELECT 1 FROM destination_state d
      WHERE d.app_id = o.app_id AND d.destination = o.destination
        AND (d.paused OR d.retry_after > %(now)s OR (NOT %(probe)s AND d.failing_since IS NOT NULL)))
  ORDER BY CASE WHEN %(probe)s THEN o.last_attempt_at END NULLS FIRST, o.id
  LIMIT %(limit)s
  FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox o
SET lease_until = %(lease_until)s, lease_owner = %(owner)s,
    first_attempt_at = coalesce(o.first_attempt_at, %(now)s)
FROM candidates c
WHERE o.id = c.id
RETURNING o.id, o.message_id, o.app_id, o.destination, o.subscriber,
  ARRAY(SELECT e::text FROM jsonb_array_elements(o.body) e),
  ARRAY(SELECT e->>'messageId' FROM jsonb_array_elements(o.body) e),
  coalesce(o.body->0->'context'->>'environment', '') = 'sandbox',
  o.attempts, o.first_attempt_at, o.created_at
"""

FAILING = """
SELECT s.app_id, s.destination, s.probe_at FROM destination_state s
JOIN unnest(%(apps)s::text[], %(dests)s::text[]) AS r(app_id, destination)
  ON r.app_id = s.app_id AND r.destination = s.destination
WHERE s.failing_since IS NOT NULL AND NOT s.paused AND coalesce(s.retry_after, '-infinity') <= %(now)s
ORDER BY 1, 2
"""

TAKE_PROBE = """
UPDATE destination_state SET probe_at = %(slot)s
WHERE app_id = %(app)s AND destination = %(dest)s AND failing_since IS NOT NULL
  AND coalesce(probe_at, '-infinity') <= %(now)s
RETURNING 1
"""
"""The probe slot: one relay at a time probes; a killed prober's slot runs out after its timeout."""

FAILED = """
INSERT INTO destination_state (app_id, destination, failing_since, failures, failing_reason)
VALUES (%(app)s, %(dest)s, %(now)s, 1, %(reason)s)
ON CONFLICT (app_id, destination) DO UPDATE SET
  failing_since = coalesce(destination_state.failing_since, EXCLUDED.failing_since),
  failures = CASE WHEN destination_state.failing_since IS NULL THEN 1 ELSE destination_state.failures + 1 END,
  failing_reason = EXCLUDED.failing_reason
RETURNING failures
"""

RECOVERED = """
UPDATE destination_state s SET failing_since = NULL, failures = 0, failing_reason = NULL, probe_at = NULL
FROM (SELECT app_id, destination, failing_since, failures FROM destination_state
      WHERE app_id = %(app)s AND destination = %(dest)s AND failing_since <= %(sent)s FOR UPDATE) old
WHERE s.app_id = old.app_id AND s.destination = old.destination
RETURNING old.failing_since, old.failures,
  (SELECT count(*) FROM outbox o WHERE o.app_id = %(app)s AND o.destination = %(dest)s AND o.status = 'pending')
"""

RENEW = """
UPDATE outbox o SET lease_until = %(until)s
FROM (SELECT id FROM outbox WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s ORDER BY id FOR UPDATE) mine
WHERE o.id = mine.id
"""


class Relay:
    """Drains the outbox to the configured routes. One instance per thread of work; many may run."""

    def __init__(
        self,
        database_url: str,
        routes: Mapping[tuple[str, str], Route],
        config: RelayConfig | None = None,
        *,
        clock: Clock = _utc_now,
        client: SegmentClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.database_url = database_url
        self.routes = dict(routes)
        if config is not None and config.lease < MIN_LEASE:
            raise ValueError(
                f"the relay lease ({config.lease.total_seconds():g} s) must be at least "
                f"{MIN_LEASE.total_seconds():g} s: it is renewed every third of it while a request is in flight"
            )
        self.config = config or RelayConfig()
        self.clock = clock
        self.client = client or SegmentClient(backoff=self.config.backoff)
        self.rng = rng or random.Random()
        self._conn: psycopg.Connection | None = None
        self._resumed = False
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        """Serializes this relay's writes with its heartbeat's renewals (no lock-order deadlock)."""
        self._lease_deadline = datetime.max.replace(tzinfo=UTC)
        self._held: list[int] = []
        self._probing: set[tuple[str, str]] = set()
        self._hb_conn: psycopg.Connection | None = None

    # -- connection -------------------------------------------------------------------------------

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.database_url, autocommit=True)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(StoreError):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._drop_connection()
        if self._hb_conn is not None:
            with contextlib.suppress(StoreError):
                self._hb_conn.close()
            self._hb_conn = None
        self.client.close()

    # -- the lease heartbeat ----------------------------------------------------------------------

    def _heartbeat(self, done: threading.Event) -> None:
        """Renew the lease of the rows this pass holds every third of the lease, until `done`.

        Its own connection: the pass thread may be in the middle of a request. A renewal that fails
        is retried at the next tick; if renewals keep failing, the pass stops starting requests
        before the lease could run out (see `_attempt`), and the rows return after the lease.
        """
        interval = self.config.lease.total_seconds() / 3
        while not done.wait(interval):
            try:
                self.renew_lease()
            except StoreError as exc:
                log.warning("could not renew the lease of %d rows (%s); retrying", len(self._held), exc)
                if self._hb_conn is not None:
                    with contextlib.suppress(StoreError):
                        self._hb_conn.close()
                self._hb_conn = None

    def renew_lease(self) -> int:
        """Extend the lease of the rows this relay still holds; returns how many were renewed."""
        held = list(self._held)
        if not held:
            return 0
        if self._hb_conn is None or self._hb_conn.closed:
            self._hb_conn = connect(self.database_url, autocommit=True)
        with self._write_lock:
            now = self.clock()
            until = now + self.config.lease
            renewed = self._hb_conn.execute(
                RENEW, {"until": until, "ids": held, "owner": self.config.owner}
            ).rowcount
            self._lease_deadline = until
        return renewed

    # -- the loop ---------------------------------------------------------------------------------

    def run_pass(self) -> PassStats:
        """Claim up to `batch_rows` due rows, send them, record every outcome. Returns counts."""
        with self._lock:
            try:
                return self._run_pass()
            except StoreError:
                self._drop_connection()  # reconnect next pass; leased rows come back after the lease
                raise

    def drain(self, stop: threading.Event | None = None, max_passes: int | None = None) -> PassStats:
        """Passes until nothing is claimable right now (or `stop` is set)."""
        total = PassStats()
        passes = 0
        while not (stop and stop.is_set()):
            stats = self.run_pass()
            total.add(stats)
            passes += 1
            if stats.claimed == 0 or (max_passes is not None and passes >= max_passes):
                break
        return total

    def drain_all(self, timeout: float = 30.0, stop: threading.Event | None = None) -> PassStats:
        """Drain, then wait out retries and rate limits, until no sendable row is pending (or timeout).

        Rows of paused destinations and of unconfigured routes are not waited for.
        """
        deadline = time.monotonic() + timeout
        total = PassStats()
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            total.add(self.drain(stop))
            wait = self.next_due_in()
            if wait is None:
                break
            time.sleep(min(max(wait, 0.005), 0.25, max(deadline - time.monotonic(), 0)))
        return total

    def next_due_in(self) -> float | None:
        """Seconds until a pending row of a live route may be claimable (a failing destination's:
        until its next probe); None if there is none."""
        if not self.routes:
            return None
        apps, dests = self._route_arrays()
        now = self.clock()
        row = self._db().execute(
            """
            WITH routes(app_id, destination) AS (SELECT * FROM unnest(%s::text[], %s::text[]))
            SELECT min(greatest(o.available_at, coalesce(o.lease_until, o.available_at),
                                coalesce(d.retry_after, o.available_at),
                                CASE WHEN d.failing_since IS NOT NULL THEN d.probe_at END))
            FROM outbox o JOIN routes r ON r.app_id = o.app_id AND r.destination = o.destination
            LEFT JOIN destination_state d ON d.app_id = o.app_id AND d.destination = o.destination
            WHERE o.status = 'pending' AND NOT coalesce(d.paused, false)
            """,
            (apps, dests),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        due: datetime = row[0]
        return max((due - now).total_seconds(), 0.0)

    def _route_arrays(self) -> tuple[list[str], list[str]]:
        keys = sorted(self.routes)
        return [a for a, _ in keys], [d for _, d in keys]

    def _run_pass(self) -> PassStats:
        stats = PassStats()
        if not self.routes:
            return stats
        if not self._resumed:
            self._resume_changed_routes()
            self._resumed = True
        rows = self._claim()
        stats.claimed = len(rows)
        if not rows:
            return stats
        self._held = [row.id for row in rows]
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(done,), name="subledger-lease", daemon=True)
        heartbeat.start()
        try:
            groups: dict[tuple[str, str, bool], list[Row]] = defaultdict(list)
            for row in rows:
                groups[(row.app_id, row.destination, row.sandbox)].append(row)
            for (app_id, destination, sandbox), group in groups.items():
                route = self.routes[(app_id, destination)]
                self._send_group(route, route.key_for(sandbox), group, stats)
        finally:
            done.set()
            heartbeat.join(timeout=self.config.lease.total_seconds())
            self._held = []
        return stats

    def _claim(self) -> list[Row]:
        now = self.clock()
        self._lease_deadline = now + self.config.lease
        apps, dests = self._route_arrays()
        conn = self._db()
        params: dict[str, Any] = {
            "apps": apps,
            "dests": dests,
            "now": now,
            "limit": self.config.batch_rows,
            "lease_until": now + self.config.lease,
            "owner": self.config.owner,
            "probe": False,
        }
        self._probing = set()
        with self._write_lock, conn.transaction():
            failing = conn.execute(FAILING, params).fetchall()
            fetched = conn.execute(CLAIM, params).fetchall()
            for app_id, destination, probe_at in failing:
                if probe_at is not None and probe_at > now:
                    continue
                route = self.routes[(app_id, destination)]
                slot = now + timedelta(seconds=route.timeout_seconds + 1)
                taken = conn.execute(
                    TAKE_PROBE, {"slot": slot, "app": app_id, "dest": destination, "now": now}
                ).fetchone()
                if taken is None:
                    continue  # another relay is probing it
                probe = conn.execute(
                    CLAIM,
                    {**params, "apps": [app_id], "dests": [destination], "probe": True,
                     "limit": self.config.probe_rows},
                ).fetchall()
                if probe:
                    self._probing.add((app_id, destination))
                    fetched.extend(probe)
                else:  # nothing to probe with yet: give the slot back
                    conn.execute(
                        "UPDATE destination_state SET probe_at = %s WHERE app_id = %s AND destination = %s",
                        (probe_at, app_id, destination),
                    )
        rows = [
            Row(
                id=r[0], message_id=r[1], app_id=r[2], destination=r[3], subscriber=r[4],
                messages=tuple(m.encode() for m in r[5]), message_ids=tuple(r[6]), sandbox=bool(r[7]),
                attempts=r[8], first_attempt_at=r[9], created_at=r[10],
            )
            for r in fetched
        ]
        rows.sort(key=lambda row: row.id)
        for row in rows:
            if row.first_attempt_at is not None and now - row.first_attempt_at > DEDUP_WINDOW:
                metrics.REDELIVERIES_PAST_DEDUP.labels(row.app_id, row.destination).inc()
                log.warning(
                    "redelivering %s to %s/%s %.1f h after its first attempt: past Segment's 24 h "
                    "dedup window, a destination may see it twice",
                    row.message_id, row.app_id, row.destination,
                    (now - row.first_attempt_at).total_seconds() / 3600,
                    extra={"message_id": row.message_id, "app_id": row.app_id, "destination": row.destination},
                )
        return rows

    # -- sending ----------------------------------------------------------------------------------

    def _send_group(self, route: Route, key: str, rows: list[Row], stats: PassStats) -> None:
        limits: dict[str, int] = {}
        if self.config.max_batch_bytes:
            limits["max_bytes"] = self.config.max_batch_bytes
        if self.config.max_batch_events:
            limits["max_events"] = self.config.max_batch_events
        packed = plan(rows, lambda r: r.messages, **limits)
        if packed.oversize:
            outcome = _Outcome()
            now = self.clock()
            for row in packed.oversize:
                size = max(len(m) for m in row.messages)
                reason = oversize_verdict(size).reason
                outcome.dead.append((row, None, reason))
                outcome.attempts.append((row.message_id, now, None, "dead", reason))
            self._record(route, outcome, stats)
        stopped = False
        probe = (route.app_id, route.destination) in self._probing
        for batch in packed.batches:
            outcome = _Outcome(probe=probe)
            if stopped:
                outcome.release.extend(batch)
            else:
                self._attempt(route, key, list(batch), outcome, stats)
                # After a failure, the rest of this pass's rows for the destination go back unsent:
                # one timeout per pass, not one per batch, and never past the lease.
                stopped = (outcome.pause is not None or outcome.wait_until is not None or bool(outcome.retry)
                           or outcome.failure is not None)
            self._record(route, outcome, stats)

    def _attempt(self, route: Route, key: str, rows: list[Row], outcome: _Outcome, stats: PassStats) -> None:
        """Send `rows` in one request; on a content refusal, bisect to find the culprits."""
        if outcome.pause is not None or outcome.wait_until is not None or outcome.failure is not None:
            outcome.release.extend(rows)
            return
        if self._lease_deadline - self.clock() < self.config.lease / 3:
            # The heartbeat renews every third of the lease: it is failing, and the lease could run
            # out mid-request. Let a fresh claim send these rows.
            outcome.release.extend(rows)
            return
        messages = [m for row in rows for m in row.messages]
        sent = self.clock()
        response = self.client.post(
            route.endpoint, key, messages, gzip_body=route.gzip, timeout=route.timeout_seconds
        )
        stats.requests += 1
        now = self.clock()
        verdict = classify(
            response.status, response.headers, response.body, now,
            attempts=0, jitter=self.rng.random(), backoff=self.config.backoff,
        )
        metrics.REQUEST_SECONDS.observe(response.elapsed)
        metrics.REQUESTS.labels(route.app_id, route.destination, _kind(verdict, response)).inc()
        for row in rows:
            row.tries += 1
        if destination_failed(verdict):
            assert isinstance(verdict, RetryAt)
            outcome.failure, outcome.answered = (verdict.reason, verdict.at), None
        else:
            outcome.failure, outcome.answered = None, sent
        self._apply(route, key, rows, response, verdict, now, outcome, stats)

    def _apply(
        self,
        route: Route,
        key: str,
        rows: list[Row],
        response: Response,
        verdict: Verdict,
        now: datetime,
        outcome: _Outcome,
        stats: PassStats,
    ) -> None:
        status = response.status
        text = _describe(response, verdict)

        def attempt(row: Row, what: str) -> None:
            outcome.attempts.append((row.message_id, now, status, what, text))

        if isinstance(verdict, Delivered):
            outcome.delivered_status = verdict.status
            for row in rows:
                attempt(row, "delivered")
            outcome.delivered.extend(rows)
        elif isinstance(verdict, Paused):
            for row in rows:
                attempt(row, "paused")
            outcome.pause = (verdict.status, verdict.reason)
            outcome.release.extend(rows)
        elif isinstance(verdict, RetryAt) and verdict.destination_wide:
            for row in rows:
                attempt(row, "rate_limited")
            outcome.wait_until = verdict.at
            outcome.retry.extend((row, now, status, verdict.reason) for row in rows)
        elif isinstance(verdict, RetryAt) and outcome.probe:
            # The destination was already failing: this says nothing about the row, whose own backoff
            # does not grow. It waits on the destination's backoff (probe_at) instead.
            for row in rows:
                attempt(row, "retry")
                outcome.retry.append((row, now, status, verdict.reason))
        elif isinstance(verdict, RetryAt):
            for row in rows:
                attempt(row, "retry")
                at = max(verdict.at, now + self.config.backoff.delay(row.attempts + row.tries - 1,
                                                                     self.rng.random()))
                outcome.retry.append((row, at, status, verdict.reason))
        elif isinstance(verdict, Poisoned) and verdict.message_ids:
            for row in rows:
                if verdict.message_ids.intersection(row.message_ids):
                    attempt(row, "dead")
                    outcome.dead.append((row, status, verdict.reason))
                else:
                    attempt(row, "delivered")
                    outcome.delivered.append(row)
        elif isinstance(verdict, Poisoned) and len(rows) > 1:
            for row in rows:
                attempt(row, "split")
            first, second = halves(rows)
            self._attempt(route, key, list(first), outcome, stats)
            self._attempt(route, key, list(second), outcome, stats)
        else:
            assert isinstance(verdict, Poisoned)
            attempt(rows[0], "dead")
            outcome.dead.append((rows[0], status, verdict.reason))

    # -- recording --------------------------------------------------------------------------------

    def _record(self, route: Route, outcome: _Outcome, stats: PassStats) -> None:
        """One short transaction for everything one batch came to."""
        now = self.clock()
        owner = self.config.owner
        conn = self._db()
        with self._write_lock, conn.transaction():
            if outcome.attempts:
                cols = list(zip(*outcome.attempts, strict=True))
                conn.execute(
                    """
                    INSERT INTO outbox_attempts (message_id, attempted_at, status_code, outcome, response)
                    SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::int[], %s::text[], %s::text[])
                    """,
                    [list(c) for c in cols],
                )
            if outcome.delivered:
                conn.execute(
                    """
                    WITH t(id, tries) AS (SELECT * FROM unnest(%(ids)s::bigint[], %(tries)s::int[])),
                    gone AS (
                      DELETE FROM outbox o USING t WHERE o.id = t.id
                      RETURNING o.*, t.tries
                    )
                    INSERT INTO outbox_delivered (message_id, transition_id, destination, app_id, subscriber,
                      body, attempts, created_at, first_attempt_at, delivered_at, status_code)
                    SELECT message_id, transition_id, destination, app_id, subscriber, body,
                      attempts + tries, created_at, first_attempt_at, %(now)s, %(status)s FROM gone
                    ON CONFLICT (message_id) DO NOTHING
                    """,
                    {
                        "ids": [r.id for r in outcome.delivered],
                        "tries": [r.tries for r in outcome.delivered],
                        "now": now,
                        "status": outcome.delivered_status,
                    },
                )
            if outcome.dead:
                conn.execute(
                    """
                    UPDATE outbox o SET status = 'dead', attempts = o.attempts + t.tries,
                      last_attempt_at = %(now)s, last_status = t.status, last_error = t.error,
                      lease_until = NULL, lease_owner = NULL
                    FROM unnest(%(ids)s::bigint[], %(tries)s::int[], %(statuses)s::int[], %(errors)s::text[])
                      AS t(id, tries, status, error)
                    WHERE o.id = t.id AND o.lease_owner = %(owner)s
                    """,
                    {
                        "ids": [r.id for r, _, _ in outcome.dead],
                        "tries": [r.tries for r, _, _ in outcome.dead],
                        "statuses": [s for _, s, _ in outcome.dead],
                        "errors": [e for _, _, e in outcome.dead],
                        "now": now,
                        "owner": owner,
                    },
                )
            if outcome.retry:
                conn.execute(
                    """
                    UPDATE outbox o SET attempts = o.attempts + t.tries, available_at = t.at,
                      last_attempt_at = %(now)s, last_status = t.status, last_error = t.error,
                      lease_until = NULL, lease_owner = NULL
                    FROM unnest(%(ids)s::bigint[], %(tries)s::int[], %(ats)s::timestamptz[],
                                %(statuses)s::int[], %(errors)s::text[]) AS t(id, tries, at, status, error)
                    WHERE o.id = t.id AND o.lease_owner = %(owner)s
                    """,
                    {
                        "ids": [r.id for r, _, _, _ in outcome.retry],
                        "tries": [r.tries for r, _, _, _ in outcome.retry],
                        "ats": [a for _, a, _, _ in outcome.retry],
                        "statuses": [s for _, _, s, _ in outcome.retry],
                        "errors": [e for _, _, _, e in outcome.retry],
                        "now": now,
                        "owner": owner,
                    },
                )
            if outcome.release:
                conn.execute(
                    """
                    UPDATE outbox o SET attempts = o.attempts + t.tries,
                      lease_until = NULL, lease_owner = NULL
                    FROM unnest(%s::bigint[], %s::int[]) AS t(id, tries)
                    WHERE o.id = t.id AND o.lease_owner = %s
                    """,
                    ([r.id for r in outcome.release], [r.tries for r in outcome.release], owner),
                )
            if outcome.pause is not None:
                pause(conn, route.app_id, route.destination, outcome.pause[1], now, key=route.fingerprint())
            if outcome.wait_until is not None:
                conn.execute(
                    """
                    INSERT INTO destination_state (app_id, destination, retry_after) VALUES (%s, %s, %s)
                    ON CONFLICT (app_id, destination) DO UPDATE
                      SET retry_after = greatest(destination_state.retry_after, EXCLUDED.retry_after)
                    """,
                    (route.app_id, route.destination, outcome.wait_until),
                )
            self._record_health(conn, route, outcome, now)
        self._count(route, outcome, stats, now)

    def _record_health(self, conn: psycopg.Connection, route: Route, outcome: _Outcome, now: datetime) -> None:
        """A failure backs the destination off (the next probe at its backoff); an answer ends an outage."""
        where = {"app": route.app_id, "dest": route.destination, "now": now}
        if outcome.failure is not None:
            reason, asked = outcome.failure
            row = conn.execute(FAILED, {**where, "reason": reason}).fetchone()
            failures = int(row[0]) if row else 1
            probe_at = next_probe(now, failures, self.rng.random(), self.config.destination_backoff, asked)
            conn.execute(
                "UPDATE destination_state SET probe_at = %s WHERE app_id = %s AND destination = %s",
                (probe_at, route.app_id, route.destination),
            )
            if failures == 1:
                outcome.started_failing = 1
        elif outcome.answered is not None:
            # A probe is sent only while the destination fails, so its answer always ends the outage
            # (whatever the clocks of the relays say); another request's, if sent after it began.
            sent = _FAR_FUTURE if outcome.probe else outcome.answered
            ended = conn.execute(RECOVERED, {**where, "sent": sent}).fetchone()
            if ended is not None:
                since, failures, backlog = ended
                outcome.recovered = (max((now - since).total_seconds(), 0.0), int(failures), int(backlog))

    def _count(self, route: Route, outcome: _Outcome, stats: PassStats, now: datetime) -> None:
        labels = (route.app_id, route.destination)
        stats.delivered += len(outcome.delivered)
        stats.dead += len(outcome.dead)
        stats.retried += len(outcome.retry)
        stats.released += len(outcome.release)
        if outcome.delivered:
            # One line per delivered batch (not per message, not per idle tick).
            log.info("delivered a batch of %d to %s/%s", len(outcome.delivered), *labels,
                     extra={"app_id": labels[0], "destination": labels[1]})
            metrics.DELIVERED.labels(*labels).inc(len(outcome.delivered))
            for row in outcome.delivered:
                metrics.LATENCY.observe(max((now - row.created_at).total_seconds(), 0.0))
        if outcome.dead:
            metrics.DEAD.labels(*labels).inc(len(outcome.dead))
            for row, _, reason in outcome.dead:
                log.warning(
                    "dead-lettered %s for %s/%s: %s", row.message_id, *labels, reason,
                    extra={"message_id": row.message_id, "app_id": labels[0], "destination": labels[1]},
                )
        for row, _, status, reason in outcome.retry:
            kind = "rate_limited" if status == 429 else "no_response" if status is None else "server_error"
            metrics.RETRIES.labels(*labels, kind).inc()
            log.debug("retry %s later: %s", row.message_id, reason)
        if outcome.pause is not None:
            metrics.PAUSES.labels(*labels).inc()
            log.error(
                "paused destination %s/%s: %s; its rows stay pending. Fix the write key or endpoint "
                "(the destination resumes when its configuration changes) or run `subledger outbox resume`",
                *labels, outcome.pause[1], extra={"app_id": labels[0], "destination": labels[1]},
            )
        if outcome.wait_until is not None:
            log.warning("%s/%s asked us to wait until %s", *labels, outcome.wait_until.isoformat())
        if outcome.started_failing is not None and outcome.failure is not None:
            log.warning(
                "destination %s/%s is failing (%s): holding its backlog, probing it with one request at "
                "most every %g s", *labels, outcome.failure[0], self.config.destination_backoff.cap_seconds,
                extra={"app_id": labels[0], "destination": labels[1]},
            )
        if outcome.recovered is not None:
            seconds, failures, backlog = outcome.recovered
            log.info(
                "destination %s/%s recovered after %.1f s (%d failed %s); releasing a backlog of %d %s",
                *labels, seconds, failures, "request" if failures == 1 else "requests",
                backlog, "row" if backlog == 1 else "rows",
                extra={"app_id": labels[0], "destination": labels[1]},
            )

    def _resume_changed_routes(self) -> None:
        """A destination paused for a key or endpoint that has since changed in the config resumes."""
        keys = sorted(self.routes)
        resumed = self._db().execute(
            """
            UPDATE destination_state s SET paused = false, paused_reason = NULL, paused_at = NULL,
              paused_key = NULL
            FROM unnest(%s::text[], %s::text[], %s::text[]) AS r(app_id, destination, fingerprint)
            WHERE s.app_id = r.app_id AND s.destination = r.destination AND s.paused
              AND s.paused_key IS NOT NULL AND s.paused_key <> r.fingerprint
            RETURNING s.app_id, s.destination
            """,
            (
                [a for a, _ in keys],
                [d for _, d in keys],
                [self.routes[k].fingerprint() for k in keys],
            ),
        ).fetchall()
        for app_id, destination in resumed:
            log.info("resumed %s/%s: its endpoint or write key changed since it was paused",
                     app_id, destination)


def _kind(verdict: Verdict, response: Response) -> str:
    if isinstance(verdict, Delivered):
        return "delivered"
    if isinstance(verdict, Paused):
        return "paused"
    if isinstance(verdict, Poisoned):
        return "refused"
    if response.status == 429:
        return "rate_limited"
    return "no_response" if response.status is None else "server_error"


def _describe(response: Response, verdict: Verdict) -> str:
    if response.status is None:
        return excerpt(response.error or "no response")
    return excerpt(response.body) if response.body else str(response.status)


def pause(
    conn: psycopg.Connection,
    app_id: str,
    destination: str,
    reason: str,
    now: datetime,
    *,
    key: str | None = None,
) -> None:
    """Stop sending to a destination; its rows stay pending. `key`: resume when the config changes."""
    conn.execute(
        """
        INSERT INTO destination_state (app_id, destination, paused, paused_reason, paused_at, paused_key)
        VALUES (%s, %s, true, %s, %s, %s)
        ON CONFLICT (app_id, destination) DO UPDATE SET paused = true, paused_reason = EXCLUDED.paused_reason,
          paused_at = EXCLUDED.paused_at, paused_key = EXCLUDED.paused_key
        """,
        (app_id, destination, reason, now, key),
    )


def resume(conn: psycopg.Connection, app_id: str, destination: str | None = None) -> list[tuple[str, str]]:
    """Resume one destination of an app, or all of them; also lifts a pending rate-limit wait, and a
    failing destination is probed at once."""
    rows = conn.execute(
        """
        UPDATE destination_state SET paused = false, paused_reason = NULL, paused_at = NULL,
          paused_key = NULL, retry_after = NULL, probe_at = NULL
        WHERE app_id = %s AND (%s::text IS NULL OR destination = %s)
        RETURNING app_id, destination
        """,
        (app_id, destination, destination),
    ).fetchall()
    return [(a, d) for a, d in rows]


def pending_counts(conn: psycopg.Connection) -> Iterable[tuple[str, str, str, int]]:
    """(app_id, destination, status, count) for the outbox, for `/readyz` and metrics."""
    return conn.execute(
        "SELECT app_id, destination, status, count(*) FROM outbox GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()

