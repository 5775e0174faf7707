"""The relay's Prometheus counters, in one place so `/metrics` and the relay agree on names.

Counters live in the process that relays (`serve`, `relay`); the gauges of outbox depth, dead
letters, oldest pending age and paused destinations are read from the database at scrape time
(app/http.py), so they are right whichever process did the work.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
