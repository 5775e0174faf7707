"""The scheduler: the relay job, its NOTIFY wake-up, and the inferred-expiration job (APScheduler 3.x).

- The relay job runs every `relay_interval` (1 s), never twice at once in a process
  (max_instances=1), missed runs coalesced. It drains: passes until nothing is claimable.
- A listener thread holds its own connection with `LISTEN subledger_outbox` and runs the relay job
  at once on a notification. NOTIFY is a hint only (sent after commit, lost on a dropped connection):
  the interval still polls, and the listener checks its connection every `listener_check` seconds,
  reconnecting and waking the relay when it had to (a notification may have been missed meanwhile).
- Lease expiry, the retry sweep and a failing destination's probes need no job of their own: a
  claim takes any pending row whose `available_at` and lease (10 s, renewed by the relay while it
  works) have passed, and one probe row of a failing destination once its `probe_at` has; the
  1 s interval makes a probe at most a second late.
- The expiration job (lifecycle rule 6) logs an inferred expiration for live subscriptions whose
  period ended more than the app's grace ago, through the normal ingest transaction.
- The prune job (`[retention]`, hourly) bounds the delivery tables in small batches
  (store/retention.py); one pruner at a time per database, whichever processes run it.
- Jobs the app wires in (`PeriodicJob`: reconciliation, app/reconcile_schedule.py) run on their own
  interval, first after their delay, never twice at once in a process, missed runs coalesced; each
  is handed the stop event so a long wait (an API's backoff) ends when the process stops. They run
  on a pool of their own (`job_workers` threads), so runs that wait on a store's API never hold the
  threads the relay needs every second; a run queued behind others still runs when a thread frees
  (no misfire limit), where the default 1 s grace would skip it.
- `stop()` waits for a running relay pass to finish recording, so a batch is never left half-marked;
  a pass interrupted by a kill is recovered by the lease.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from apscheduler.events import EVENT_JOB_ERROR, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler

from subledger.core.errors import StoreError
from subledger.core.lifecycle import inferred_expiration
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.outbox.relay import Relay
from subledger.store import log as event_log
from subledger.store import outbox as outbox_sql
from subledger.store import projections, retention
from subledger.store.db import DEFAULT_TIMEOUT_SECONDS, connect
from subledger.store.retention import Pruned, Retention

log = logging.getLogger("subledger.scheduler")


class _SkippedRunFilter(logging.Filter):
    """Drops APScheduler's "maximum number of running instances reached" warning.

    The relay job runs every second with max_instances=1 and drains until nothing is claimable,
    so while a backlog drains every tick finds it still running: that skip is the design (a
    wake-up is never lost, see relay_job), not a problem, and it would be logged once a second.
    The relay logs one line per delivered batch instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


_SKIPS = _SkippedRunFilter()

DEFAULT_GRACE = timedelta(hours=24)
WIRED = "wired"  # the executor of the app's PeriodicJobs
EXPIRATION_BATCH = 200

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SchedulerConfig:
    relay_interval: float = 1.0
    listener_check: float = 5.0
    """The poll fallback: a silent listener is checked (and the relay run) at least this often."""
    expiration_interval: float = 60.0
    expirations: bool = True
    prune_interval: float = 3600.0
    prune_delay: float = 60.0
    """The first prune runs this long after start (not at once, and not only after a whole interval)."""
    database_timeout: float = DEFAULT_TIMEOUT_SECONDS
    """How long a job's or the listener's connection may take (`database_timeout_seconds`)."""
    job_workers: int = 2
    """Threads for the wired-in `PeriodicJob`s (reconciliation), apart from the relay's."""


@dataclass(frozen=True)
class PeriodicJob:
    """A job wired in by the app layer (the scheduler imports nothing of app/): `run(stop)` every
    `interval` seconds, the first after `delay`. `run` handles its own expected failures (a store's
    API down is a warning and the next run retries); what escapes is logged by `_on_error`."""

    id: str
    run: Callable[[threading.Event], object]
    interval: float
    delay: float = 0.0


class Scheduler:
    """Owns the background jobs of one process (`serve` or `relay`)."""

    def __init__(
        self,
        database_url: str,
        relay: Relay,
        *,
        policy: IngestPolicy | None = None,
        grace: Mapping[str, timedelta] | None = None,
        config: SchedulerConfig | None = None,
        clock: Clock = _utc_now,
        retention: Retention | None = None,
        jobs: Sequence[PeriodicJob] = (),
    ) -> None:
        self.database_url = database_url
        self.jobs = tuple(jobs)
        self.retention = retention  # None: no prune job in this process
        self.relay = relay
        self.policy = policy or IngestPolicy()
        self.grace = dict(grace or {})
        self.config = config or SchedulerConfig()
        self.clock = clock
        self._scheduler = BackgroundScheduler(timezone=UTC, executors={
            "default": ThreadPoolExecutor(), WIRED: ThreadPoolExecutor(self.config.job_workers)})
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._running = False
        self._running_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listen_conn: psycopg.Connection | None = None
        self.listener_reconnects = 0
        self.listener_healthy = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        self._scheduler.add_job(
            self.relay_job, "interval", seconds=self.config.relay_interval, id="relay",
            max_instances=1, coalesce=True, next_run_time=datetime.now(UTC),
        )
        if self.config.expirations:
            self._scheduler.add_job(
                self.expiration_job, "interval", seconds=self.config.expiration_interval, id="expiration",
                max_instances=1, coalesce=True, next_run_time=datetime.now(UTC),
            )
        if self.retention is not None:
            self._scheduler.add_job(
                self.prune_job, "interval", seconds=self.config.prune_interval, id="prune",
                max_instances=1, coalesce=True,
                next_run_time=datetime.now(UTC) + timedelta(seconds=self.config.prune_delay),
            )
        for job in self.jobs:
            self._scheduler.add_job(
                job.run, "interval", seconds=job.interval, id=job.id, args=[self._stop], executor=WIRED,
                max_instances=1, coalesce=True, misfire_grace_time=None,
                next_run_time=datetime.now(UTC) + timedelta(seconds=job.delay),
            )
        self._scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        skips = logging.getLogger("apscheduler.scheduler")
        if _SKIPS not in skips.filters:
            skips.addFilter(_SKIPS)
        self._scheduler.start()
        self._listener = threading.Thread(target=self._listen, name="subledger-listener", daemon=True)
        self._listener.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; wait for a running pass to record its outcome."""
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(SchedulerNotRunningError):  # stopped before (or without) start()
            self._scheduler.shutdown(wait=True)
        if self._listener is not None:
            self._listener.join(timeout=timeout)
        self.relay.close()

    def wait(self) -> None:
        """Block until `stop()` is called (from a signal handler)."""
        while not self._stop.wait(0.5):
            pass

    def request_stop(self) -> None:
        self._stop.set()

    def wake(self) -> None:
        """Run the relay now (or right after the running pass)."""
        with self._running_lock:
            self._wake.set()
            if self._stop.is_set() or self._running:
                return  # the running pass sees the flag and drains again
        # not started yet, or shut down meanwhile: the interval (or nobody) runs the relay
        with contextlib.suppress(JobLookupError, SchedulerNotRunningError):
            self._scheduler.modify_job("relay", next_run_time=datetime.now(UTC))

    def _on_error(self, event: JobExecutionEvent) -> None:
        """A database failure is one line (the next run retries); anything else is a bug: traceback."""
        if isinstance(event.exception, StoreError):
            log.warning("job %s failed (%s); the next run retries", event.job_id, event.exception)
        else:
            log.error("job %s failed", event.job_id, exc_info=event.exception)

    # -- jobs -------------------------------------------------------------------------------------

    def relay_job(self) -> None:
        """Drain; if a wake-up arrived meanwhile, drain again (a wake-up is never lost to max_instances)."""
        with self._running_lock:
            self._running = True
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    self.relay.drain(self._stop)
                except StoreError as exc:
                    log.warning("relay pass failed (%s); the next run reconnects", exc)
                    return
                with self._running_lock:
                    if not self._wake.is_set():
                        self._running = False
                        return
        finally:
            with self._running_lock:
                self._running = False

    def expiration_job(self) -> int:
        """Rule 6: ingest inferred expirations for periods that ended more than the grace ago."""
        return infer_expirations(self.database_url, self.policy, self.grace, self.clock(), stop=self._stop,
                                 timeout=self.config.database_timeout)

    def prune_job(self) -> Pruned | None:
        """Retention (store/retention.py): small batches, each its own short transaction, so neither
        ingest nor the relay ever waits on it; a failed run is retried by the next one."""
        if self.retention is None:
            return None
        configured = set(self.relay.routes) | {
            (app_id, d.name) for app_id, dests in self.policy.destinations.items() for d in dests
        }
        try:
            with connect(self.database_url, timeout=self.config.database_timeout) as conn:
                pruned = retention.prune(conn, self.retention, self.clock(), configured=configured,
                                         stop=self._stop)
        except StoreError as exc:
            log.warning("prune run failed (%s); the next run continues", exc)
            return None
        if pruned.total:
            log.info("pruned %d attempts, %d delivered bodies, %d duplicate receipts, %d destination states"
                     " in %d batches", pruned.attempts, pruned.delivered, pruned.duplicate_receipts,
                     pruned.destination_state, pruned.batches)
        if pruned.incomplete and not self._stop.is_set():
            log.info("prune run stopped early (%s); the next run continues", pruned.incomplete)
        return pruned

    # -- the listener -----------------------------------------------------------------------------

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                conn = connect(self.database_url, autocommit=True, timeout=self.config.database_timeout)
            except Exception as exc:  # kept alive whatever happens: the relay's wake-ups depend on it
                self.listener_healthy = False
                log.warning("listener cannot connect (%s); retrying in %.1f s, the relay polls meanwhile",
                            exc, backoff, exc_info=None if isinstance(exc, StoreError) else exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._listen_conn = conn
            try:
                outbox_sql.listen(conn)
                self.listener_healthy = True
                backoff = 0.5
                self.wake()  # anything committed while we were not listening
                self._listen_on(conn)
            except StoreError as exc:
                if not self._stop.is_set():
                    self.listener_reconnects += 1
                    log.warning("listener connection lost (%s); reconnecting", exc)
            except Exception:  # a bug: say where, and keep listening (the relay's wake-ups depend on it)
                self.listener_reconnects += 1
                log.exception("listener failed; reconnecting")
                self._stop.wait(backoff)
            finally:
                self.listener_healthy = False
                self._listen_conn = None
                conn.close()  # psycopg's close never raises, even on a lost connection

    def _listen_on(self, conn: psycopg.Connection) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            for _ in conn.notifies(timeout=0.5, stop_after=1):
                self.wake()
            if time.monotonic() - last_check >= self.config.listener_check:
                outbox_sql.check_listener(conn)  # raises on a dead connection: reconnect, then wake
                last_check = time.monotonic()
                self.wake()  # the ≤ 5 s poll fallback, whatever the interval says


def infer_expirations(
    database_url: str,
    policy: IngestPolicy,
    grace: Mapping[str, timedelta],
    now: datetime,
    *,
    stop: threading.Event | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> int:
    """Ingest one inferred expiration per overdue subscription; returns how many were new."""
    shortest = min([*grace.values(), DEFAULT_GRACE])
    made = 0
    with connect(database_url, timeout=timeout) as conn:
        after: tuple[datetime, str] | None = None
        # Paged, so subscriptions whose inference was a no-op never starve the ones behind them.
        while not (stop is not None and stop.is_set()):
            page = projections.due_states(conn, now - shortest, after, EXPIRATION_BATCH)
            conn.commit()
            if not page:
                break
            after = (page[-1][0], page[-1][1])
            items: list[Incoming] = []
            for _, _, state in page:
                event = inferred_expiration(state, now, grace.get(state.app_id, DEFAULT_GRACE))
                if event is None:
                    continue
                known = event_log.contains(conn, event.source.value, event.id)
                conn.commit()
                if known:
                    continue  # inferred before and a no-op: do not log a duplicate receipt every minute
                raw = json.dumps(event.to_facts(), sort_keys=True, separators=(",", ":")).encode()
                items.append(Incoming(Notification.of(event), raw))
            if items:
                made += _ingest(conn, items, policy, now)
    if made:
        log.info("inferred %d expirations", made)
    return made


def _ingest(conn: psycopg.Connection, items: list[Incoming], policy: IngestPolicy, now: datetime) -> int:
    outcomes = ingest(conn, items, policy, now)
    return sum(1 for o in outcomes if o.result == "new")


def grace_by_app(apps: Mapping[str, Any]) -> dict[str, timedelta]:
    """`AppSettings.expiration_grace_hours` per app (duck-typed: scheduler does not import app)."""
    return {app_id: timedelta(hours=app.expiration_grace_hours) for app_id, app in apps.items()}
