"""The composition root: settings in, wired services out. Nothing happens at import time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from subledger.app.settings import Settings
from subledger.outbox.ingest import IngestPolicy
from subledger.store.db import resolve_url

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    settings: Settings
    database_url: str
    policy: IngestPolicy
    clock: Clock = field(default=utc_now)

    @property
    def database_timeout(self) -> float:
        """Seconds a request or a command waits for the database before it reports it unavailable."""
        return self.settings.database_timeout_seconds


def build(settings: Settings, *, database_url: str | None = None, clock: Clock = utc_now) -> Services:
    url = resolve_url(database_url or settings.database_url)
    policy = IngestPolicy(
        destinations=settings.destinations(),
        horizon=settings.historical_horizon,
        reconciliation_horizon=settings.reconciliation_publish,
        settle_delay={
            app_id: timedelta(seconds=app.settle_delay_seconds) for app_id, app in settings.apps.items()
        },
    )
    return Services(settings=settings, database_url=url, policy=policy, clock=clock)
