"""Wiring of the background side (relay + scheduler) from the settings; shared by `serve` and `relay`.

Kept apart from the CLI so the demo, the tests and the bench build exactly what production runs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from types import FrameType
from typing import Any

from subledger.app import logs
from subledger.app.bootstrap import Services
from subledger.core.delivery import Backoff
from subledger.outbox.relay import Relay, RelayConfig
from subledger.outbox.routes import routes_from
from subledger.scheduler.service import Scheduler, SchedulerConfig, grace_by_app


def configure_logging(level: int = logging.INFO) -> None:
    logs.configure(level)


def build_relay(
    services: Services,
    *,
    batch_rows: int = 1000,
    lease_seconds: float = 10.0,
    backoff_base: float = 1.0,
    backoff_cap: float = 300.0,
) -> Relay:
    config = RelayConfig(
        batch_rows=batch_rows,
        lease=timedelta(seconds=lease_seconds),
        backoff=Backoff(backoff_base, backoff_cap),
        database_timeout=services.database_timeout,  # as the HTTP pool: one setting for every connection
    )
    return Relay(services.database_url, routes_from(services.settings.apps), config, clock=services.clock)


def build_scheduler(
    services: Services,
    relay: Relay,
    *,
    interval: float = 1.0,
    expirations: bool = True,
    reconciliation: bool = True,
) -> Scheduler:
    """The relay, expiration, prune and reconciliation jobs (the last per store and app with API
    credentials, `[reconciliation]`: app/reconcile_schedule.py)."""
    from subledger.app.reconcile_schedule import scheduled_jobs  # deferred: the store API clients

    retention = services.settings.retention
    return Scheduler(
        services.database_url,
        relay,
        policy=services.policy,
        grace=grace_by_app(services.settings.apps),
        config=SchedulerConfig(relay_interval=interval, expirations=expirations,
                               prune_interval=retention.interval_minutes * 60,
                               database_timeout=services.database_timeout),
        clock=services.clock,
        retention=retention.policy() if retention.enabled else None,
        jobs=scheduled_jobs(services) if reconciliation else (),
    )


def serve_http(asgi: Any, *, host: str, port: int) -> None:
    """Run uvicorn until SIGTERM/SIGINT, then return normally so the process exits 0.

    uvicorn re-raises a signal it handled once it has shut down (so a bare `uvicorn.run` ends
    "killed by SIGTERM", exit -15); a service manager and the README expect a clean exit after a
    graceful stop, so this server handles the signals without re-raising them. Its own log lines
    go through app/logs.py's formatter: JSON when stderr is not a terminal, like every other line.
    """
    import uvicorn  # deferred: the ASGI server loads only in a process that serves HTTP

    log = logging.getLogger("subledger")

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(signum: int, frame: FrameType | None) -> None:
                log.info("received %s: finishing requests in flight, then stopping", signal.Signals(signum).name)
                self.handle_exit(signum, frame)

            previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    config = uvicorn.Config(asgi, host=host, port=port, log_config=logs.uvicorn_log_config(), log_level="info")
    server = Server(config)
    server.run()
    if not server.started:  # e.g. the address is in use: uvicorn logged why
        raise SystemExit(1)
    log.info("stopped")


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
