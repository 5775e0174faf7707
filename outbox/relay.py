"""The outbox relay: claim due rows, POST them to their destination, record the outcome.

The relay is a loop over store operations: claim (store/outbox.py) → send (outbox/dispatch.py,
which packs, posts through outbox/segment.py and bisects) → the pure verdict (core/delivery.py) →
record the outcome (store/outbox.py, one short transaction per batch). Where a destination is and
with which key comes from its `Route` (outbox/routes.py). This module keeps what ties them
together: the lease and its heartbeat, the probe of a failing destination, the log lines, metrics.
Database failures reach it as subledger's `StoreError` (the store's door translates them).

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

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from subledger.core.delivery import PROBE_CAP_SECONDS, Backoff, next_probe
from subledger.core.errors import StoreError
from subledger.outbox import metrics
from subledger.outbox.dispatch import Dispatcher, Outcome
from subledger.outbox.routes import Route
from subledger.outbox.segment import SegmentClient
from subledger.store import outbox as store
from subledger.store.db import DEFAULT_TIMEOUT_SECONDS, connect
from subledger.store.outbox import ClaimedRow, DeadLetter, Lease, RetryLater, Tried

log = logging.getLogger("subledger.relay")

DEDUP_WINDOW = timedelta(hours=24)
"""Segment keeps at least 24 h of messageIds; a resend after that may be a duplicate downstream."""

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


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
    database_timeout: float = DEFAULT_TIMEOUT_SECONDS
    """How long a (re)connection to the database may take (`database_timeout_seconds`): during an
    outage a pass fails within it and the next run retries, rather than hanging a job on a dead host."""

    @property
    def destination_backoff(self) -> Backoff:
        return Backoff(self.backoff.base_seconds, min(self.backoff.cap_seconds, self.probe_cap_seconds))


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


@dataclass(frozen=True, slots=True)
class _Health:
    """What recording a batch did to its destination's health, for the log lines."""

    started_failing: bool = False
    recovered: store.Recovery | None = None


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
        self.dispatcher = Dispatcher(
            self.client, clock=self.clock, rng=self.rng, backoff=self.config.backoff,
            may_send=self._lease_is_safe, max_batch_bytes=self.config.max_batch_bytes,
            max_batch_events=self.config.max_batch_events,
        )
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
            self._conn = connect(self.database_url, autocommit=True, timeout=self.config.database_timeout)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()  # psycopg's close never raises, even on a lost connection
            self._conn = None

    def close(self) -> None:
        self._drop_connection()
        self._drop_heartbeat_connection()
        self.client.close()

    # -- the lease heartbeat ----------------------------------------------------------------------

    def _heartbeat(self, done: threading.Event) -> None:
        """Renew the lease of the rows this pass holds every third of the lease, until `done`.

        Its own connection: the pass thread may be in the middle of a request. A renewal that fails
        is retried at the next tick; if renewals keep failing, the pass stops starting requests
        before the lease could run out (see `_lease_is_safe`), and the rows return after the lease.
        """
        interval = self.config.lease.total_seconds() / 3
        while not done.wait(interval):
            try:
                self.renew_lease()
            except StoreError as exc:
                log.warning("could not renew the lease of %d rows (%s); retrying", len(self._held), exc)
                self._drop_heartbeat_connection()

    def _drop_heartbeat_connection(self) -> None:
        if self._hb_conn is not None:
            self._hb_conn.close()
            self._hb_conn = None

    def renew_lease(self) -> int:
        """Extend the lease of the rows this relay still holds; returns how many were renewed."""
        held = list(self._held)
        if not held:
            return 0
        if self._hb_conn is None or self._hb_conn.closed:
            self._hb_conn = connect(self.database_url, autocommit=True, timeout=self.config.database_timeout)
        with self._write_lock:
            until = self.clock() + self.config.lease
            renewed = store.renew_lease(self._hb_conn, held, Lease(self.config.owner, until))
            self._lease_deadline = until
        return renewed

    def _lease_is_safe(self) -> bool:
        """A request may start: the lease cannot run out during it. The heartbeat renews every third
        of the lease, so less than a third left means it is failing: a fresh claim sends the rows."""
        return self._lease_deadline - self.clock() >= self.config.lease / 3

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
        now = self.clock()
        due = store.next_due(self._db(), sorted(self.routes))
        if due is None:
            return None
        return max((due - now).total_seconds(), 0.0)

    def _run_pass(self) -> PassStats:
        """claim → send (per destination and key, `Dispatcher`) → record each batch's outcome."""
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
            groups: dict[tuple[str, str, bool], list[ClaimedRow]] = defaultdict(list)
            for row in rows:
                groups[(row.app_id, row.destination, row.sandbox)].append(row)
            for (app_id, destination, sandbox), group in groups.items():
                route = self.routes[(app_id, destination)]

                def record(outcome: Outcome, route: Route = route) -> None:
                    self._record(route, outcome, stats)

                self.dispatcher.send(route, route.key_for(sandbox), group,
                                     probe=(app_id, destination) in self._probing, record=record)
        finally:
            done.set()
            heartbeat.join(timeout=self.config.lease.total_seconds())
            self._held = []
        return stats

    def _claim(self) -> list[ClaimedRow]:
        """Due rows of healthy destinations, plus one probe per failing destination whose turn it is
        (one relay at a time probes: the slot is held until the probe's timeout has passed)."""
        now = self.clock()
        lease = Lease(self.config.owner, now + self.config.lease)
        self._lease_deadline = lease.until
        routes = sorted(self.routes)
        conn = self._db()
        self._probing = set()
        with self._write_lock, conn.transaction():
            failing = store.failing_destinations(conn, routes, now)
            rows = store.claim(conn, routes, now, lease, self.config.batch_rows)
            for dest in failing:
                if dest.probe_at is not None and dest.probe_at > now:
                    continue
                key = (dest.app_id, dest.destination)
                slot = now + timedelta(seconds=self.routes[key].timeout_seconds + 1)
                if not store.take_probe_slot(conn, dest.app_id, dest.destination, now, slot):
                    continue  # another relay is probing it
                probe = store.claim(conn, [key], now, lease, self.config.probe_rows, probe=True)
                if probe:
                    self._probing.add(key)
                    rows.extend(probe)
                else:  # nothing to probe with yet: give the slot back
                    store.set_probe_at(conn, dest.app_id, dest.destination, dest.probe_at)
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

    # -- recording --------------------------------------------------------------------------------

    def _record(self, route: Route, outcome: Outcome, stats: PassStats) -> None:
        """One short transaction for everything one batch came to."""
        now = self.clock()
        owner = self.config.owner
        tries = outcome.tries
        conn = self._db()
        with self._write_lock, conn.transaction():
            store.record_attempts(conn, outcome.attempts)
            store.mark_delivered(conn, [Tried(r.id, tries[r.id]) for r in outcome.delivered], now,
                                 outcome.delivered_status)
            store.mark_dead(conn, [DeadLetter(r.id, tries[r.id], status, error)
                                   for r, status, error in outcome.dead], now, owner)
            store.schedule_retries(conn, [RetryLater(r.id, tries[r.id], at, status, error)
                                          for r, at, status, error in outcome.retry], now, owner)
            store.release(conn, [Tried(r.id, tries[r.id]) for r in outcome.release], owner)
            if outcome.pause is not None:
                store.pause_destination(conn, route.app_id, route.destination, outcome.pause[1], now,
                                        key=route.fingerprint())
            if outcome.wait_until is not None:
                store.hold_destination(conn, route.app_id, route.destination, outcome.wait_until)
            health = self._record_health(conn, route, outcome, now)
        self._count(route, outcome, health, stats, now)

    def _record_health(self, conn: psycopg.Connection, route: Route, outcome: Outcome, now: datetime) -> _Health:
        """A failure backs the destination off (the next probe at its backoff); an answer ends an outage."""
        if outcome.failure is not None:
            reason, asked = outcome.failure
            failures = store.record_failure(conn, route.app_id, route.destination, reason, now)
            probe_at = next_probe(now, failures, self.rng.random(), self.config.destination_backoff, asked)
            store.set_probe_at(conn, route.app_id, route.destination, probe_at)
            return _Health(started_failing=failures == 1)
        if outcome.answered is not None:
            # A probe is sent only while the destination fails, so its answer always ends the outage
            # (whatever the clocks of the relays say); another request's, if sent after it began.
            sent = _FAR_FUTURE if outcome.probe else outcome.answered
            return _Health(recovered=store.record_recovery(conn, route.app_id, route.destination, sent))
        return _Health()

    def _count(self, route: Route, outcome: Outcome, health: _Health, stats: PassStats, now: datetime) -> None:
        labels = (route.app_id, route.destination)
        stats.requests += outcome.requests
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
        if health.started_failing and outcome.failure is not None:
            log.warning(
                "destination %s/%s is failing (%s): holding its backlog, probing it with one request at "
                "most every %g s", *labels, outcome.failure[0], self.config.destination_backoff.cap_seconds,
                extra={"app_id": labels[0], "destination": labels[1]},
            )
        if health.recovered is not None:
            ended = health.recovered
            seconds = max((now - ended.failing_since).total_seconds(), 0.0)
            log.info(
                "destination %s/%s recovered after %.1f s (%d failed %s); releasing a backlog of %d %s",
                *labels, seconds, ended.failures, "request" if ended.failures == 1 else "requests",
                ended.backlog, "row" if ended.backlog == 1 else "rows",
                extra={"app_id": labels[0], "destination": labels[1]},
            )

    def _resume_changed_routes(self) -> None:
        """A destination paused for a key or endpoint that has since changed in the config resumes."""
        fingerprints = {key: route.fingerprint() for key, route in self.routes.items()}
        for app_id, destination in store.resume_reconfigured(self._db(), fingerprints):
            log.info("resumed %s/%s: its endpoint or write key changed since it was paused",
                     app_id, destination)
