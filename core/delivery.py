"""What a Segment-compatible endpoint's answer means, and how messages are packed into requests.

Pure on purpose: the relay's hardest decisions (retry or dead-letter? wait how long? which
messages share a request?) are table-tested here without a socket, a database or a clock. The
caller passes `now` and the jitter draw.

Verdicts, after segment.md "Delivery semantics":

    2xx (and not Jitsu's {"ok": false})   Delivered
    429                                   RetryAt, destination-wide, at Retry-After / X-RateLimit-Reset
    5xx, 408, timeouts, resets            RetryAt on the rows, capped exponential backoff, equal jitter
                                          (while a destination fails this way, the relay backs off
                                          the destination and probes it: `destination_failed`)
    401, 403, 404                         Paused: the key, the source or the endpoint is wrong; every
                                          message would fail the same way, so none is dead-lettered
    other 4xx (400 bad JSON, 413 size)    Poisoned: the relay splits the batch to find the culprit(s)
    200 {"ok": false, "errors": [...]}    Poisoned naming the refused messageIds (Jitsu answers 200
                                          per batch and lists per-event failures in the body)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

MAX_MESSAGE_BYTES = 32 * 1024
"""Segment refuses a single event over 32 KB with a 400; such a message is dead-lettered unsent."""
MAX_BATCH_BYTES = 500_000
"""Segment's limit per /v1/batch request (decimal KB, the stricter reading)."""
MAX_BATCH_EVENTS = 2_500
"""Above this Segment answers 200 and drops the events, so the limit must never be reached."""
ENVELOPE_BYTES = len(b'{"batch":[],"sentAt":"2026-01-01T00:00:00.000Z"}') + 64
"""The bytes around the messages, with headroom."""
MAX_WAIT = timedelta(hours=1)
"""A Retry-After beyond this is treated as this: a wrong header must not park a destination for days."""
EXCERPT_CHARS = 500

_JITSU_ID = re.compile(r"Message ID: ([A-Za-z0-9._-]+)")


@dataclass(frozen=True, slots=True)
class Delivered:
    """The endpoint took every message of the request."""

    status: int


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Try again at `at`. `destination_wide`: the endpoint asked for a pause (429), not just these rows."""

    at: datetime
    reason: str
    status: int | None = None
    destination_wide: bool = False


@dataclass(frozen=True, slots=True)
class Poisoned:
    """The request was refused for its content. Empty `message_ids`: the culprit is unknown, split."""

    reason: str
    status: int | None = None
    message_ids: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Paused:
    """The destination refuses us as a whole (bad write key, disabled source): stop sending to it."""

    reason: str
    status: int


Verdict = Delivered | RetryAt | Poisoned | Paused


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with equal jitter (pg-boss's formula): half fixed, half random."""

    base_seconds: float = 1.0
    cap_seconds: float = 300.0

    def delay(self, attempts: int, jitter: float) -> timedelta:
        """The wait after `attempts` failed tries (0 = first failure); `jitter` is a draw in [0, 1)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** min(max(attempts, 0), 30))
        return timedelta(seconds=ceiling / 2 + ceiling / 2 * min(max(jitter, 0.0), 1.0))


PROBE_CAP_SECONDS = 5.0
"""The longest wait between probes of a failing destination. A probe is one small request, so
probing often costs nothing, and it bounds how long a recovered destination waits for its backlog."""


def destination_failed(verdict: Verdict) -> bool:
    """The destination itself failed (5xx, 408, no response, throttling), not these messages.

    Such a failure says nothing about the rows: the relay backs off the destination as a whole and
    probes it, instead of growing each row's own backoff (which would outlast the outage). A 429 is
    an answer with its own wait (Retry-After), and any other answer shows the destination is up.
    """
    return isinstance(verdict, RetryAt) and not verdict.destination_wide


def next_probe(
    now: datetime, failures: int, jitter: float, backoff: Backoff, asked: datetime | None = None
) -> datetime:
    """When to probe a destination after its `failures`-th consecutive failed request (1 = the first).

    `backoff` is the destination's (capped at PROBE_CAP_SECONDS by the relay); `asked` is a time the
    endpoint asked for (a 503's Retry-After), which is honoured when later.
    """
    at = now + backoff.delay(failures - 1, jitter)
    return at if asked is None else max(at, asked)


def excerpt(body: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    """A printable start of a response body, for last_error and the attempts record."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def requested_wait(headers: Mapping[str, str], now: datetime) -> timedelta | None:
    """Retry-After (seconds or an HTTP date), else X-RateLimit-Reset (seconds, or an epoch time)."""
    h = _lower(headers)
    value = h.get("retry-after")
    if value is not None:
        value = value.strip()
        try:
            return _clamp(timedelta(seconds=float(value)))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return _clamp(when - now)
    reset = h.get("x-ratelimit-reset")
    if reset is not None:
        try:
            seconds = float(reset.strip())
        except ValueError:
            return None
        if seconds > 1e9:  # an epoch timestamp rather than a delta
            return _clamp(datetime.fromtimestamp(seconds, UTC) - now)
        return _clamp(timedelta(seconds=seconds))
    return None


def _clamp(wait: timedelta) -> timedelta:
    return max(timedelta(0), min(wait, MAX_WAIT))


def _jitsu_refusals(body: bytes) -> tuple[frozenset[str], str] | None:
    """Jitsu's `200 {"ok": false, "errors": ["Message ID: x: reason", ...]}`, else None."""
    if not body or body[:1] not in (b"{", b" ", b"\n"):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parsed, dict) or parsed.get("ok") is not False:
        return None
    errors = parsed.get("errors") or []
    texts = [str(e) for e in errors] if isinstance(errors, list) else [str(errors)]
    ids = frozenset(m.group(1) for t in texts for m in _JITSU_ID.finditer(t))
    return ids, "; ".join(texts) or "ok: false"


def classify(
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    *,
    attempts: int = 0,
    jitter: float = 0.5,
    backoff: Backoff = Backoff(),
) -> Verdict:
    """The verdict on one request. `status` None means no response (timeout, reset, refused);
    `body` then says what happened. `attempts` counts the earlier failures of these rows."""
    retry_at = now + backoff.delay(attempts, jitter)
    if status is None:
        return RetryAt(retry_at, f"no response: {excerpt(body)}")
    text = excerpt(body)
    if 200 <= status < 300:
        refused = _jitsu_refusals(body)
        if refused is None:
            return Delivered(status)
        ids, reason = refused
        if "throttl" in reason.lower():
            return RetryAt(retry_at, f"{status} throttled: {excerpt(reason)}", status)
        return Poisoned(f"{status} refused: {excerpt(reason)}", status, ids)
    if status == 429:
        wait = requested_wait(headers, now)
        at = now + wait if wait is not None else retry_at
        return RetryAt(at, f"429 rate limited: {text}", status, destination_wide=True)
    if status in (401, 403, 404):
        return Paused(f"{status}: {text}", status)
    if status == 408 or status >= 500:
        wait = requested_wait(headers, now)
        at = max(retry_at, now + wait) if wait is not None else retry_at
        return RetryAt(at, f"{status}: {text}", status)
    if 400 <= status < 500:
        return Poisoned(f"{status}: {text}", status)
    # 1xx/3xx: a proxy or a redirect we do not follow; try again later rather than lose anything.
    return RetryAt(retry_at, f"unexpected {status}: {text}", status)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Plan(Generic[T]):
    """Requests to make, in order, and the items that can never be sent."""

    batches: tuple[tuple[T, ...], ...]
    oversize: tuple[T, ...]


def plan(
    items: Sequence[T],
    messages: Callable[[T], Sequence[bytes]],
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_events: int = MAX_BATCH_EVENTS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> Plan[T]:
    """Pack items (each one or more serialized messages that must travel together) into batches.

    Order is kept; an item with a message over `max_message_bytes` goes to `oversize` instead.
    """
    batches: list[tuple[T, ...]] = []
    oversize: list[T] = []
    current: list[T] = []
    size = ENVELOPE_BYTES
    events = 0
    for item in items:
        msgs = messages(item)
        if any(len(m) > max_message_bytes for m in msgs):
            oversize.append(item)
            continue
        item_bytes = sum(len(m) + 1 for m in msgs)
        if current and (size + item_bytes > max_bytes or events + len(msgs) > max_events):
            batches.append(tuple(current))
            current, size, events = [], ENVELOPE_BYTES, 0
        current.append(item)
        size += item_bytes
        events += len(msgs)
    if current:
        batches.append(tuple(current))
    return Plan(tuple(batches), tuple(oversize))


def halves(batch: Sequence[T]) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """Bisect a refused batch to isolate its poison message(s)."""
    middle = len(batch) // 2
    return tuple(batch[:middle]), tuple(batch[middle:])


def encode_batch(messages: Sequence[bytes], sent_at: str) -> bytes:
    """The /v1/batch body around already-serialized messages (the outbox's exact bytes)."""
    return b'{"batch":[' + b",".join(messages) + b'],"sentAt":"' + sent_at.encode() + b'"}'
