"""`/v1/audit/...`: the audit queries over HTTP, answering with the same documents as `subledger audit --json`.

Every route needs the bearer token (declared once, on the router). Subscriber names and
subscription keys contain slashes (`app/store/id`), so they are `path` parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator

from subledger.app.http import docs
from subledger.app.http.common import now_of, pool_of, require_token
from subledger.app.wording import one_of
from subledger.core.chain import Arrival
from subledger.core.errors import ApiError
from subledger.core.events import EARLIEST_TIME, LATEST_TIME, TIME_RANGE, Environment, EventType, Source
from subledger.store import audit

_END = object()
router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[Depends(require_token)])


def _in_range(value: datetime | None) -> datetime | None:
    """A query time in UTC, inside the range events may name: `0001-01-01T00:00:00+14:00` is before
    year 1 in UTC, and `until` minus a day must not overflow either (422, never a 500)."""
    if value is None:
        return None
    try:
        instant = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        instant = None
    if instant is None or not EARLIEST_TIME <= instant < LATEST_TIME:
        raise ValueError(TIME_RANGE)
    return instant


TimeQuery = Annotated[
    datetime | None, Query(description="RFC 3339; a time without offset is UTC."), AfterValidator(_in_range)
]


def utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def document(value: Any) -> JSONResponse:
    return JSONResponse(audit.jsonable(value))


@router.get("/timeline/{subscriber:path}", summary="Log entries, transitions and deliveries of a subscriber",
            responses=docs.responses(docs.DOCUMENT_OK, docs.errors(401, 404, 422, 503)))
def get_timeline(subscriber: str, request: Request) -> JSONResponse:
    with pool_of(request).connection() as conn:
        found = audit.timeline(conn, subscriber)
    if not found.subscriptions:
        raise ApiError(404, f"no subscription found for {subscriber!r}")
    return document(found)


@router.get("/state/{subscription:path}", summary="A subscription's state folded from the log up to a time",
            responses=docs.responses(docs.DOCUMENT_OK, docs.errors(401, 404, 422, 503)))
def get_state(subscription: str, request: Request, at: TimeQuery = None) -> JSONResponse:
    when = utc(at) or now_of(request)
    with pool_of(request).connection() as conn:
        found = audit.state_at(conn, subscription, when)
    if found is None:
        raise ApiError(404, f"the log holds no facts for subscription {subscription!r}")
    return document(found)


@router.get("/explain/{ref}", summary="Causing log entry → transition → messages → attempts",
            responses=docs.responses(docs.DOCUMENT_OK, docs.errors(401, 404, 422, 503)))
def get_explain(ref: str, request: Request) -> JSONResponse:
    with pool_of(request).connection() as conn:
        found = audit.explain(conn, ref)
    if found is None:
        raise ApiError(404, f"no transition or message {ref!r}")
    return document(found)


@router.get("/events", summary="Log entries as NDJSON, streamed in constant memory",
            response_class=docs.NDJSONResponse,
            responses=docs.responses(docs.NDJSON_OK, docs.errors(401, 422, 503)))
def get_events(
    request: Request,
    app_id: str | None = None,
    source: str | None = None,
    type: str | None = None,
    environment: str | None = None,
    since: TimeQuery = None,
    until: TimeQuery = None,
    subscriber: str | None = None,
    arrival: str | None = None,
) -> StreamingResponse:
    for name, value, allowed, what in (("source", source, Source, "source"), ("type", type, EventType, "event type"),
                                       ("environment", environment, Environment, "environment"),
                                       ("arrival", arrival, Arrival, "arrival")):
        reason = one_of(value, allowed, what)
        if reason is not None:
            raise ApiError(422, f"{name}: {reason}", field=name)
    flt = audit.EventFilter(app_id=app_id, source=source, type=type, environment=environment,
                            since=utc(since), until=utc(until), subscriber=subscriber, arrival=arrival)
    pool = pool_of(request)

    def lines() -> Iterator[bytes]:
        # The connection is held while the client reads; the server-side cursor keeps memory flat.
        with pool.connection() as conn:
            rows = iter(audit.events(conn, flt))
            first = next(rows, _END)
            yield b""  # primed: connection and first row in hand, so a database failure was a 503
            chunk: list[bytes] = []
            for row in rows if first is _END else itertools.chain((first,), rows):
                chunk.append(orjson.dumps(audit.jsonable(row)) + b"\n")
                if len(chunk) >= 500:
                    yield b"".join(chunk)
                    chunk.clear()
            if chunk:
                yield b"".join(chunk)

    stream = lines()
    next(stream)  # before the 200 is sent: an unreachable database must answer 503, not a cut stream
    return StreamingResponse(stream, media_type="application/x-ndjson")


@router.get("/stats", summary="Counts over a range, outbox health, delivery latency, paused destinations",
            responses=docs.responses(docs.DOCUMENT_OK, docs.errors(401, 422, 503)))
def get_stats(request: Request, since: TimeQuery = None, until: TimeQuery = None) -> JSONResponse:
    now = now_of(request)
    end = utc(until) or now
    start = utc(since) or end - timedelta(days=1)
    with pool_of(request).connection() as conn:
        found = audit.stats(conn, start, end, now)
    return document(found)
