"""The relay's Prometheus counters, in one place so `/metrics` and the relay agree on names.

Counters live in the process that relays (`serve`, `relay`); the gauges of outbox depth, dead
letters, oldest pending age and paused destinations are read from the database at scrape time
(app/http/health.py), so they are right whichever process did the work.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from subledger.store import outbox as outbox_sql
from subledger.store import reconciliation as reconciliation_sql

DELIVERED = Counter(
    "subledger_relay_delivered_total",
    "Outbox rows (one transition for one destination) acknowledged by a 2xx.",
    ["app_id", "destination"],
)
RETRIES = Counter(
    "subledger_relay_retries_total",
    "Outbox rows scheduled for another attempt, by reason (server_error, rate_limited, timeout...).",
    ["app_id", "destination", "reason"],
)
DEAD = Counter(
    "subledger_relay_dead_lettered_total",
    "Outbox rows dead-lettered (refused by the endpoint or over 32 KB).",
    ["app_id", "destination"],
)
REDELIVERIES_PAST_DEDUP = Counter(
    "subledger_relay_redeliveries_past_dedup_window_total",
    "Rows sent again more than 24 h after their first attempt: Segment may no longer drop the duplicate.",
    ["app_id", "destination"],
)
PAUSES = Counter(
    "subledger_relay_pauses_total",
    "Destinations paused after a 401/403/404.",
    ["app_id", "destination"],
)
REQUESTS = Counter(
    "subledger_relay_requests_total",
    "HTTP requests to destinations, by outcome.",
    ["app_id", "destination", "outcome"],
)
LATENCY = Histogram(
    "subledger_delivery_latency_seconds",
    "From the ingest commit that enqueued a row to its acknowledgement.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
REQUEST_SECONDS = Histogram(
    "subledger_relay_request_seconds",
    "Duration of /v1/batch requests.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 30),
)


CONTENT_TYPE = CONTENT_TYPE_LATEST

def outbox_exposition(conn: psycopg.Connection, known: Iterable[tuple[str, str]] = ()) -> bytes:
    """Gauges read from the database now: depth, dead letters, oldest pending age, paused and
    failing flags (failing: 0 for every known destination, so an alert on `== 1` has a series).

    `known` (app_id, destination) pairs are reported even when they have no rows, as zeros.
    """
    known = list(known)  # iterated twice: the depth zeros and the failing zeros
    registry = CollectorRegistry()
    pending = GaugeMetricFamily("subledger_outbox_pending", "Outbox rows waiting to be delivered.",
                                labels=["app_id", "destination"])
    dead = GaugeMetricFamily("subledger_outbox_dead", "Dead-lettered outbox rows (retryable by hand).",
                             labels=["app_id", "destination"])
    oldest = GaugeMetricFamily("subledger_outbox_oldest_pending_seconds",
                               "Age of the oldest pending outbox row; alert well before 24 h.",
                               labels=["app_id", "destination"])
    paused = GaugeMetricFamily("subledger_destination_paused",
                               "1 when a destination is paused (401/403/404 or by hand).",
                               labels=["app_id", "destination"])
    rows = outbox_sql.depths(conn)
    for key in known:
        rows.setdefault(key, outbox_sql.Depth(0, 0, None))
    for (app_id, destination), depth in sorted(rows.items()):
        pending.add_metric([app_id, destination], float(depth.pending))
        dead.add_metric([app_id, destination], float(depth.dead))
        oldest.add_metric([app_id, destination], depth.oldest_pending_seconds or 0.0)
    failing = GaugeMetricFamily("subledger_destination_failing",
                                "1 while the relay marks a destination failing (5xx, timeouts): its backlog "
                                "waits behind one probe.", labels=["app_id", "destination"])
    flags = outbox_sql.paused_flags(conn)
    for (app_id, destination), is_paused in flags.items():
        paused.add_metric([app_id, destination], 1.0 if is_paused else 0.0)
    down = {(f.app_id, f.destination) for f in outbox_sql.failing_states(conn)}
    for app_id, destination in sorted(set(flags) | set(known) | down):
        failing.add_metric([app_id, destination], 1.0 if (app_id, destination) in down else 0.0)

    # the gap report: facts reconciliation recovered that push never delivered, counted in the log
    # itself (its `arrival`), so the count is right whichever process reconciled
    recovered = CounterMetricFamily("subledger_reconciliation_recovered",
                                    "Log entries recovered by reconciliation that no webhook delivered; any "
                                    "increase means a store's push channel lost facts.", labels=["app_id", "source"])
    for (app_id, source), count in sorted(reconciliation_sql.recovered_counts(conn).items()):
        recovered.add_metric([app_id, source], float(count))

    class _Snapshot(Collector):
        def collect(self) -> Iterable[Metric]:
            return [pending, dead, oldest, paused, failing, recovered]

    registry.register(_Snapshot())
    return generate_latest(registry)


def process_exposition() -> bytes:
    """The counters and histograms of this process (relay work done here)."""
    return generate_latest(REGISTRY)
