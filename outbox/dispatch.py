"""Sending claimed rows of one destination: pack them into requests, post, bisect what is refused.

The relay (outbox/relay.py) claims and records; this module is the part in between, and touches
no database: it turns rows into requests (core/delivery.py's `plan`), each answer into a verdict
(`classify`, pure), and the verdict into an `Outcome` the relay records in one short transaction.

- A content refusal without named culprits (400, 413) splits the request in halves until the
  poison message(s) are alone and dead-lettered; the rest is delivered. Jitsu names its culprits.
- After a failure (pause, 429 wait, 5xx/timeout), the rest of the destination's rows of this pass
  go back unsent: one timeout per pass, not one per batch, and never past the lease.
- A request is not started when the lease could run out during it (the heartbeat is failing):
  the rows go back for a fresh claim instead.
- While a destination fails, a probe's failure is the destination's, not its row's: the row's own
  backoff does not grow (it waits on the destination's probe backoff instead).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from subledger.core.delivery import (
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
    plan,
)
from subledger.outbox import metrics
from subledger.outbox.routes import Route
from subledger.outbox.segment import Response, oversize_verdict
from subledger.store.outbox import Attempt, ClaimedRow

Clock = Callable[[], datetime]


class Poster(Protocol):
    """What the dispatcher needs of a client (outbox/segment.py's `SegmentClient`): one POST of
    serialized messages whose every failure is a `Response`, never an exception."""

    def post(
        self, endpoint: str, write_key: str, messages: Sequence[bytes], *, gzip_body: bool | None = None,
        timeout: float | None = None,
    ) -> Response: ...


@dataclass
class Outcome:
    """What one batch came to, for the relay to record in one short transaction."""

    probe: bool = False
    """The request probed a failing destination: a failure is the destination's, not the rows'."""
    delivered: list[ClaimedRow] = field(default_factory=list)
    delivered_status: int = 200
    dead: list[tuple[ClaimedRow, int | None, str]] = field(default_factory=list)
    """(row, status, reason)."""
    retry: list[tuple[ClaimedRow, datetime, int | None, str]] = field(default_factory=list)
    """(row, when, status, reason)."""
    release: list[ClaimedRow] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    tries: Counter[int] = field(default_factory=Counter)
    """Requests each row (by id) went out in: a bisected row is sent more than once."""
    requests: int = 0
    pause: tuple[int, str] | None = None
    """(status, reason): the destination refuses us as a whole."""
    wait_until: datetime | None = None
    """The destination asked us to wait (429)."""
    failure: tuple[str, datetime] | None = None
    """The destination failed (reason, the time it asked to wait until): back it off."""
    answered: datetime | None = None
    """When the request the destination answered (anything but a failure) was sent: it is up. A
    request sent before an outage started (by another relay) says nothing about its end."""

    @property
    def halted(self) -> bool:
        """Nothing more is sent to the destination in this batch."""
        return self.pause is not None or self.wait_until is not None or self.failure is not None


class Dispatcher:
    """Sends one destination's rows and says what became of each. One per relay (not thread-safe)."""

    def __init__(
        self,
        client: Poster,
        *,
        clock: Clock,
        rng: random.Random,
        backoff: Backoff,
        may_send: Callable[[], bool],
        max_batch_bytes: int | None = None,
        max_batch_events: int | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.rng = rng
        self.backoff = backoff
        self.may_send = may_send
        """False when the lease could run out during a request: the rows go back unsent."""
        self.limits: dict[str, int] = {}
        if max_batch_bytes:
            self.limits["max_bytes"] = max_batch_bytes
        if max_batch_events:
            self.limits["max_events"] = max_batch_events

    def send(
        self, route: Route, key: str, rows: Sequence[ClaimedRow], *, probe: bool,
        record: Callable[[Outcome], None],
    ) -> None:
        """Send `rows` (one destination, one key) in as few requests as the limits allow; `record`
        is called with each batch's outcome as soon as it is known, before the next request."""
        packed = plan(rows, lambda r: r.messages, **self.limits)
        if packed.oversize:
            outcome = Outcome()
            now = self.clock()
            for row in packed.oversize:
                reason = oversize_verdict(max(len(m) for m in row.messages)).reason
                outcome.dead.append((row, None, reason))
                outcome.attempts.append(Attempt(row.message_id, now, None, "dead", reason))
            record(outcome)
        stopped = False
        for batch in packed.batches:
            outcome = Outcome(probe=probe)
            if stopped:
                outcome.release.extend(batch)
            else:
                self._attempt(route, key, list(batch), outcome)
                stopped = outcome.halted or bool(outcome.retry)
            record(outcome)

    def _attempt(self, route: Route, key: str, rows: list[ClaimedRow], outcome: Outcome) -> None:
        """Send `rows` in one request; on a content refusal, bisect to find the culprits."""
        if outcome.halted or not self.may_send():
            outcome.release.extend(rows)
            return
        messages = [m for row in rows for m in row.messages]
        sent = self.clock()
        response = self.client.post(
            route.endpoint, key, messages, gzip_body=route.gzip, timeout=route.timeout_seconds
        )
        outcome.requests += 1
        now = self.clock()
        verdict = classify(
            response.status, response.headers, response.body, now,
            attempts=0, jitter=self.rng.random(), backoff=self.backoff,
        )
        metrics.REQUEST_SECONDS.observe(response.elapsed)
        metrics.REQUESTS.labels(route.app_id, route.destination, _kind(verdict, response)).inc()
        for row in rows:
            outcome.tries[row.id] += 1
        if destination_failed(verdict):
            assert isinstance(verdict, RetryAt)
            outcome.failure, outcome.answered = (verdict.reason, verdict.at), None
        else:
            outcome.failure, outcome.answered = None, sent
        self._apply(route, key, rows, response, verdict, now, outcome)

    def _apply(
        self,
        route: Route,
        key: str,
        rows: list[ClaimedRow],
        response: Response,
        verdict: Verdict,
        now: datetime,
        outcome: Outcome,
    ) -> None:
        status = response.status
        text = _describe(response)

        def attempt(row: ClaimedRow, what: str) -> None:
            outcome.attempts.append(Attempt(row.message_id, now, status, what, text))

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
                failed = row.attempts + outcome.tries[row.id] - 1
                at = max(verdict.at, now + self.backoff.delay(failed, self.rng.random()))
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
            self._attempt(route, key, list(first), outcome)
            self._attempt(route, key, list(second), outcome)
        else:
            assert isinstance(verdict, Poisoned)
            attempt(rows[0], "dead")
            outcome.dead.append((rows[0], status, verdict.reason))


def _kind(verdict: Verdict, response: Response) -> str:
    """The `outcome` label of the requests metric."""
    if isinstance(verdict, Delivered):
        return "delivered"
    if isinstance(verdict, Paused):
        return "paused"
    if isinstance(verdict, Poisoned):
        return "refused"
    if response.status == 429:
        return "rate_limited"
    return "no_response" if response.status is None else "server_error"


def _describe(response: Response) -> str:
    """What an attempt record keeps of the answer: the error, or the start of the body."""
    if response.status is None:
        return excerpt(response.error or "no response")
    return excerpt(response.body) if response.body else str(response.status)
