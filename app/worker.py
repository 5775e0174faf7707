"""Wiring of the background side (relay + scheduler) from the settings; shared by `serve` and `relay`.

Kept apart from the CLI so the demo, the tests and the bench build exactly what production runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import timedelta
from types import FrameType

from subledger.app.bootstrap import Services
from subledger.core.delivery import Backoff
from subledger.outbox.relay import Relay, RelayConfig, routes_from
from subledger.scheduler.service import Scheduler, SchedulerConfig, grace_by_app


def configure_logging(level: int = logging.INFO) -> None:
    from subledger.app import logs

    logs.configure(level)


def build_relay(
    services: Services,
    *,
    batch_rows: int = 1000,
    lease_seconds: float = 60.0,
    backoff_base: float = 1.0,
    backoff_cap: float = 300.0,
) -> Relay:
    config = RelayConfig(
        batch_rows=batch_rows,
        lease=timedelta(seconds=lease_seconds),
        backoff=Backoff(backoff_base, backoff_cap),
    )
    return Relay(services.database_url, routes_from(services.settings.apps), config, clock=services.clock)


def build_scheduler(
    services: Services,
    relay: Relay,
    *,
    interval: float = 1.0,
    expirations: bool = True,
) -> Scheduler:
    retention = services.settings.retention
    return Scheduler(
        services.database_url,
        relay,
        policy=services.policy,
        grace=grace_by_app(services.settings.apps),
        config=SchedulerConfig(relay_interval=interval, expirations=expirations,
                               prune_interval=retention.interval_minutes * 60),
        clock=services.clock,
        retention=retention.policy() if retention.enabled else None,
    )


def run_until_signal(scheduler: Scheduler) -> None:
    """Start, block until SIGTERM/SIGINT, then stop cleanly (a running pass records its outcome)."""
    log = logging.getLogger("subledger")
    received = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current pass, then stopping", signal.Signals(signum).name)
        received.set()
        scheduler.request_stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        scheduler.start()
        scheduler.wait()
    finally:
        scheduler.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("relay stopped")
