"""The HTTP service: canonical ingestion, health, and (later) webhooks and audit, over one pool.

Every refusal is a 4xx with a JSON body naming the problem; nothing is stored for a refused item.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg import Error as DriverError
from psycopg import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from subledger.app import http_docs as docs
from subledger.app.bootstrap import Services
from subledger.app.canonical import Rejection, to_incoming
from subledger.core import safejson
from subledger.core.errors import PayloadRejected, StoreError, StoreUnavailable
from subledger.outbox.ingest import Incoming, ingest
from subledger.store.db import Pool

MAX_BATCH = docs.MAX_BATCH  # events per request; the OpenAPI document states the same limit


class ApiError(Exception):
    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        # an absent detail is left out rather than sent as null, as the documented error schema says
        self.body = {"error": error, **{k: v for k, v in extra.items() if v is not None}}


log = logging.getLogger("subledger.http")


def database_refusal(exc: BaseException, retry_after: float) -> tuple[dict[str, str], dict[str, str]]:
    """Body and headers of a 503 for a database failure: the detail goes to the log under an id,
    the client gets the id and no driver or SQL text (it can hold table names, values, hosts)."""
    error_id = uuid.uuid4().hex[:16]
    unavailable = isinstance(exc, StoreUnavailable | OperationalError)
    log.warning("%s [error_id=%s]: %s", "database unavailable" if unavailable else "database error",
                error_id, " ".join(str(exc).split()) or type(exc).__name__, extra={"error_id": error_id})
    body = {"error": "database unavailable" if unavailable else "database error", "error_id": error_id}
    return body, {"Retry-After": str(max(1, math.ceil(retry_after)))}


def create_app(services: Services, *, pool_size: int = 8) -> FastAPI:
    timeout = services.database_timeout
    pool = Pool(services.database_url, timeout=timeout, max_size=pool_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="subledger", version="1", lifespan=lifespan)
    docs.install(app)
    from subledger.app.http_guard import RefuseUnstorableText

    app.add_middleware(RefuseUnstorableText)  # NUL / lone surrogates in a path or query: 400 on every route
    app.state.services = services
    app.state.pool = pool

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep the exception's headers: a 405 must say `Allow` (RFC 9110), a 401 `WWW-Authenticate`
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        from subledger.app.wording import validation_reason

        reason = validation_reason(first) if first else "invalid request"
        return JSONResponse({"error": f"{loc.split('.')[-1]}: {reason}" if loc else reason, "field": loc},
                            status_code=422)

    @app.exception_handler(StoreError)
    @app.exception_handler(DriverError)  # a driver error no store function translated (e.g. PoolTimeout)
    async def _store_error(_: Request, exc: Exception) -> JSONResponse:
        body, headers = database_refusal(exc, timeout)
        return JSONResponse(body, status_code=503, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        """A bug is a 500 with an id to find its traceback in the log, never the exception's text."""
        error_id = uuid.uuid4().hex[:16]
        log.error("unhandled error [error_id=%s]", error_id, exc_info=exc, extra={"error_id": error_id})
        return JSONResponse({"error": "internal error", "error_id": error_id}, status_code=500)

    def require_token(request: Request) -> None:
        expected = services.settings.api_token
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not expected:
            raise ApiError(401, "no API token is configured on the server; set SUBLEDGER_API_TOKEN")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            raise ApiError(401, "missing or wrong bearer token")

    async def read_body(request: Request) -> bytes:
        limit = services.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def run_ingest(items: list[Incoming]) -> list[Any]:
        with pool.connection() as conn:
            return ingest(conn, items, services.policy, services.clock())

    @app.post(
        "/v1/events", tags=["ingest"], summary="Ingest canonical events (one object or an array)",
        openapi_extra=docs.EVENTS_BODY,
        responses=docs.responses(docs.EVENTS_OK, docs.errors(
            400, 401, 413, 422, 503,
            _422="A single event that was rejected (`field` names why), or an empty array",
            _413="Body larger than `max_body_bytes`, or an array of more than 1,000 events")),
    )
    async def post_events(request: Request) -> JSONResponse:
        require_token(request)
        body = await read_body(request)
        try:  # one decoder for untrusted JSON: depth, numbers and text held to limits (core.safejson)
            is_array, values = safejson.loads_each(body)
        except PayloadRejected as exc:
            raise ApiError(400, exc.reason, field=exc.field) from None
        single = not is_array
        if not values:
            raise ApiError(422, "empty array: send at least one event")
        if len(values) > MAX_BATCH:
            raise ApiError(413, f"at most {MAX_BATCH} events per request, got {len(values)}")
        results: list[dict[str, Any] | None] = [None] * len(values)
        accepted: list[tuple[int, Incoming]] = []
        for i, item in enumerate(values):
            raw = body if single or isinstance(item, safejson.Refused) else json.dumps(
                item, separators=(",", ":")).encode()
            checked = to_incoming(item, raw, services.settings)
            if isinstance(checked, Rejection):
                results[i] = checked.as_json()
            else:
                accepted.append((i, checked))
        if accepted:
            outcomes = await run_in_threadpool(run_ingest, [inc for _, inc in accepted])
            for (i, _), outcome in zip(accepted, outcomes, strict=True):
                results[i] = {
                    "id": outcome.external_id,
                    "result": outcome.result,
                    "position": outcome.position,
                    "transitions": list(outcome.transitions),
                }
        if single:
            only = results[0]
            assert only is not None
            if only["result"] == "rejected":
                raise ApiError(422, only["reason"], field=only.get("field"))
            return JSONResponse(only)
        counts = {k: sum(1 for r in results if r and r["result"] == k) for k in ("new", "duplicate", "rejected")}
        return JSONResponse({"results": results, **counts})

    from subledger.app.http_webhooks import webhook_router

    app.include_router(webhook_router(services, pool, read_body))

    @app.get("/healthz", tags=["health"], responses=docs.ok(
        {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}, "The process is up"))
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses=docs.responses(docs.ok(docs.READY), docs.NOT_READY))
    def readyz() -> JSONResponse:
        try:
            with pool.connection() as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead'),"
                    " extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')) FROM outbox"
                ).fetchone()
                paused = conn.execute(
                    "SELECT app_id, destination, paused_reason, paused_at FROM destination_state WHERE paused"
                ).fetchall()
                waiting = conn.execute(
                    "SELECT app_id, destination, retry_after FROM destination_state WHERE retry_after > now()"
                ).fetchall()
        except Exception as exc:  # any failure to reach the database means not ready
            refusal, headers = database_refusal(exc, timeout)
            return JSONResponse({"status": "unavailable", **refusal}, status_code=503, headers=headers)
        assert row is not None
        body = {
            "status": "degraded" if paused else "ok",
            "pending": int(row[0]),
            "dead": int(row[1]),
            "oldest_pending_seconds": float(row[2] or 0),
            "paused_destinations": [
                {"app_id": a, "destination": d, "reason": r, "since": t.isoformat() if t else None}
                for a, d, r, t in paused
            ],
            "rate_limited_destinations": [
                {"app_id": a, "destination": d, "until": t.isoformat()} for a, d, t in waiting
            ],
        }
        return JSONResponse(body, status_code=200)

    @app.get("/metrics", tags=["health"], response_class=Response, responses=docs.METRICS_OK)
    def prometheus_metrics() -> Response:
        """Prometheus text format: this process's relay counters + outbox gauges read now."""
        from subledger.outbox.metrics import CONTENT_TYPE, outbox_exposition, process_exposition

        body = process_exposition()
        try:
            with pool.connection() as conn:
                known = [(a, d) for a, app_ in services.settings.apps.items() for d in app_.destinations]
                body += outbox_exposition(conn, known)
        except Exception as exc:  # the counters are still worth serving without the database
            refusal, _ = database_refusal(exc, timeout)
            body += f"# outbox gauges unavailable: {refusal['error']} (error_id {refusal['error_id']})\n".encode()
        return Response(body, media_type=CONTENT_TYPE)

    from subledger.app.http_audit import router as audit_router
    from subledger.app.http_ops import outbox_router, subscribers_router

    app.include_router(audit_router)
    app.include_router(outbox_router)
    app.include_router(subscribers_router)
    return app
