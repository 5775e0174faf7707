"""The HTTP service: canonical ingestion, health, and (later) webhooks and audit, over one pool.

Every refusal is a 4xx with a JSON body naming the problem; nothing is stored for a refused item.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from psycopg_pool import ConnectionPool
from starlette.exceptions import HTTPException as StarletteHTTPException

from subledger.app.bootstrap import Services
from subledger.app.canonical import Rejection, to_incoming
from subledger.core.errors import StoreError
from subledger.outbox.ingest import Incoming, ingest

MAX_BATCH = 1000


class ApiError(Exception):
    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **extra}


def _configure(conn: Any) -> None:
    conn.execute("SET idle_in_transaction_session_timeout = '60s'")
    conn.commit()


def create_app(services: Services, *, pool_size: int = 8) -> FastAPI:
    pool = ConnectionPool(
        services.database_url, min_size=1, max_size=pool_size, open=False, configure=_configure,
        kwargs={"connect_timeout": 10},
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="subledger", version="1", lifespan=lifespan)
    app.state.services = services
    app.state.pool = pool

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": first.get("msg", "invalid request"), "field": loc}, status_code=422)

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"error": f"database unavailable: {exc}"}, status_code=503)

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

    @app.post("/v1/events", tags=["ingest"], summary="Ingest canonical events (one object or an array)")
    async def post_events(request: Request) -> JSONResponse:
        require_token(request)
        body = await read_body(request)
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON: {exc}") from None
        single = not isinstance(value, list)
        values = [value] if single else value
        if not values:
            raise ApiError(422, "empty array: send at least one event")
        if len(values) > MAX_BATCH:
            raise ApiError(413, f"at most {MAX_BATCH} events per request, got {len(values)}")
        results: list[dict[str, Any] | None] = [None] * len(values)
        accepted: list[tuple[int, Incoming]] = []
        for i, item in enumerate(values):
            raw = body if single else json.dumps(item, separators=(",", ":")).encode()
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

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        try:
            with pool.connection(timeout=5) as conn:
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
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
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

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus text format: this process's relay counters + outbox gauges read now."""
        from subledger.outbox.metrics import CONTENT_TYPE, outbox_exposition, process_exposition

        body = process_exposition()
        try:
            with pool.connection(timeout=5) as conn:
                known = [(a, d) for a, app_ in services.settings.apps.items() for d in app_.destinations]
                body += outbox_exposition(conn, known)
        except Exception as exc:  # the counters are still worth serving without the database
            body += f"# outbox gauges unavailable: {str(exc).splitlines()[0] if str(exc) else exc!r}\n".encode()
        return Response(body, media_type=CONTENT_TYPE)

    from subledger.app.http_audit import router as audit_router
    from subledger.app.http_ops import outbox_router, subscribers_router

    app.include_router(audit_router)
    app.include_router(outbox_router)
    app.include_router(subscribers_router)
    return app
