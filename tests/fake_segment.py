"""A fake Segment for the relay tests: a real HTTP server on 127.0.0.1 with faults on a schedule.

Built on the capture sink (outbox/sink.py), which already records bodies, checks Basic auth and
Segment's size rules and counts messageIds; this adds a script of faults for the next requests,
poison messageIds answered with a 400, Jitsu's 200 {"ok": false} mode, and helpers to fill a
test database with lifecycle transitions.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from subledger.app import settings as settings_module
from subledger.core.events import parse_event
from subledger.core.sources import Notification
from subledger.outbox.ingest import Incoming, IngestPolicy, ingest
from subledger.outbox.routes import Route, routes_from
from subledger.outbox.sink import Reply, Request, Reset, Sink

APP = "com.test.app"
WRITE_KEY = "wk-live"
SANDBOX_KEY = "wk-sandbox"
Fault = Reply | Reset | None


class FakeSegment:
    """`script`: what to answer to the next requests, in order (None = answer normally)."""

    def __init__(self, *, write_keys: Iterable[str] = (WRITE_KEY, SANDBOX_KEY), jitsu: bool = False) -> None:
        self.script: deque[Fault] = deque()
        self.poison: set[str] = set()
        self.jitsu = jitsu
        self.hook: Callable[[Request], Fault] | None = None
        self.seen_requests: list[Request] = []
        self._lock = threading.Lock()
        self.sink = Sink(write_keys=set(write_keys), responder=self._respond)
        self.capture = self.sink.capture

    @property
    def url(self) -> str:
        return self.sink.url

    def __enter__(self) -> FakeSegment:
        self.sink.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop()

    def then(self, *faults: Fault) -> FakeSegment:
        with self._lock:
            self.script.extend(faults)
        return self

    def _respond(self, request: Request) -> Reply | Reset | None:
        if self.hook is not None:
            hooked = self.hook(request)
            if hooked is not None:
                return hooked
        with self._lock:
            self.seen_requests.append(request)
            if self.script:
                fault = self.script.popleft()
                if fault is not None:
                    return fault
        ids = {str(m.get("messageId")) for m in request.messages}
        bad = ids & self.poison
        if bad and not self.jitsu:
            return Reply(400, {"error": f"invalid message {sorted(bad)[0]}"})
        if bad and self.jitsu:
            good = [m for m in request.messages if str(m.get("messageId")) not in bad]
            self.capture.add(
                Request(request.number, request.path, request.headers, request.write_key, request.raw,
                        tuple(good), request.received_at)
            )
            return Reply(200, {"ok": False, "receivedEvents": len(request.messages), "okEvents": len(good),
                               "errors": [f"Message ID: {i}: event error: bad event" for i in sorted(bad)]})
        return None

    def requests_with(self, message_id: str) -> list[Request]:
        with self._lock:
            return [r for r in self.seen_requests if any(m.get("messageId") == message_id for m in r.messages)]


def settings_for(endpoint: str, *, destinations: Sequence[str] = ("segment",), **extra: Any) -> Any:
    dest = {"write_key": WRITE_KEY, "endpoint": endpoint, "publish_historical": True,
            "timeout_seconds": 2.0, **extra}
    return settings_module.from_dict({"apps": {APP: {"destinations": {d: dict(dest) for d in destinations}}}})


def routes_for(settings: Any) -> dict[tuple[str, str], Route]:
    return routes_from(settings.apps)


def lifecycle(n: int, *, renewals: int = 2, start: datetime | None = None, prefix: str = "s",
              environment: str = "production", app_user: bool = True) -> list[dict[str, Any]]:
    """Canonical events of one subscription: trial, conversion, renewals, cancellation, expiration.

    Each event makes exactly one transition, so a lifecycle of `renewals` renewals makes
    renewals + 4 transitions.
    """
    at = start or datetime(2026, 9, 1, tzinfo=UTC)
    sub = f"{prefix}{n:06d}"
    base: dict[str, Any] = {"app_id": APP, "subscription_id": sub, "store": "app_store",
                            "environment": environment, "country_code": "US"}
    if app_user:
        base["app_user_id"] = f"user-{sub}"
    out: list[dict[str, Any]] = []
    period = timedelta(days=7)

    def add(kind: str, **fields: Any) -> None:
        out.append({**base, "id": f"{sub}-{len(out)}", "type": kind, "occurred_at": at.isoformat(), **fields})

    add("purchase", product_id="monthly", period_type="trial", price="0", currency="USD",
        expires_at=(at + period).isoformat(), transaction_id=f"{sub}-t0")
    for r in range(renewals + 1):
        at += period
        add("renewal", product_id="monthly", price="9.99", currency="USD",
            expires_at=(at + period).isoformat(), transaction_id=f"{sub}-t{r + 1}")
    at += timedelta(days=2)
    add("auto_renew_disabled", reason="unsubscribe")
    at += period
    add("expiration", reason="unsubscribe", expires_at=at.isoformat())
    return out


def transitions_per_lifecycle(renewals: int = 2) -> int:
    return renewals + 4


def ingest_events(db_url: str, settings: Any, events: Sequence[dict[str, Any]], *,
                  now: datetime | None = None, chunk: int = 500) -> int:
    """Ingest canonical events in chunks; returns the number of transitions made."""
    policy = IngestPolicy(destinations=settings.destinations("test"), horizon=settings.historical_horizon)
    when = now or datetime.now(UTC)
    made = 0
    with psycopg.connect(db_url) as conn:
        for i in range(0, len(events), chunk):
            items = [
                Incoming(Notification.of(parse_event(e)), repr(e).encode()) for e in events[i : i + chunk]
            ]
            for outcome in ingest(conn, items, policy, when):
                made += len(outcome.transitions)
    return made


def write_config(path: Any, endpoint: str, **extra: Any) -> Any:
    """The TOML a `subledger relay` subprocess reads."""
    lines = [f'[apps."{APP}".destinations.segment]', f'write_key = "{WRITE_KEY}"', f'endpoint = "{endpoint}"',
             "publish_historical = true", "timeout_seconds = 1.0"]
    lines += [f"{k} = {v!r}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def requests_so_far(fake: FakeSegment) -> int:
    return fake.sink._counter


def outbox_counts(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        delivered = conn.execute("SELECT count(*) FROM outbox_delivered").fetchone()
    out = {status: int(n) for status, n in rows}
    out["delivered"] = int(delivered[0]) if delivered else 0
    return out
