"""`/v1/outbox/...`: list what waits, retry what died, pause or resume a destination, over HTTP.

The same operations as `subledger outbox ...`; every route needs the bearer token (declared once,
on the router).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from subledger.app.http import docs
from subledger.app.http.common import now_of, pool_of, require_token, services_of
from subledger.core.errors import ApiError, NotFound, UnknownTarget
from subledger.outbox import ops
from subledger.outbox.ingest import wake_relay
from subledger.store import audit

router = APIRouter(prefix="/v1/outbox", tags=["outbox"], dependencies=[Depends(require_token)])
ROWS = {"type": "object", "required": ["rows"], "properties": {"rows": docs.ANY_OBJECTS}}
PAUSED = {"type": "object", "required": ["paused"], "properties": {"paused": docs.DESTINATIONS}}
RESUMED = {"type": "object", "required": ["resumed"], "properties": {"resumed": docs.DESTINATIONS}}


@router.get("", summary="Rows waiting in the outbox",
            responses=docs.responses(docs.ok(ROWS), docs.errors(401, 422, 503)))
def list_outbox(
    request: Request, status: Literal["pending", "dead"] | None = None, app_id: str | None = None, limit: int = 100
) -> JSONResponse:
    if not 1 <= limit <= 10_000:
        raise ApiError(422, "limit must be between 1 and 10000", field="limit")
    pool = pool_of(request)
    with pool.connection() as conn:
        rows = ops.list_rows(conn, status=status, app_id=app_id, limit=limit)
    return JSONResponse({"rows": audit.jsonable(rows)})


def _retry(request: Request, ref: str | None, dead: bool) -> JSONResponse:
    pool, services, now = pool_of(request), services_of(request), now_of(request)
    with pool.connection() as conn:
        try:
            with conn.transaction():
                result = ops.retry(conn, services.policy, now, ref=ref, dead=dead)
        except NotFound as exc:
            raise ApiError(409 if exc.delivered else 404, str(exc)) from None
        if result.requeued:
            wake_relay(conn)
    return JSONResponse(result.as_json())


@router.post("/dead/retry", summary="Retry every dead row",
            responses=docs.responses(docs.RETRY_OK, docs.errors(401, 503)))
def retry_dead(request: Request) -> JSONResponse:
    return _retry(request, None, True)


@router.post("/{ref}/retry", summary="Retry one row (outbox id or messageId), keeping its messageId",
            responses=docs.responses(docs.RETRY_OK, docs.errors(
                401, 404, 409, 422, 503, _404="No outbox row has this id or messageId",
                _409="The message was already delivered")))
def retry_one(ref: str, request: Request) -> JSONResponse:
    return _retry(request, ref, False)


@router.post("/pause/{app_id}", summary="Pause an app's destination(s) until resumed",
            responses=docs.responses(docs.ok(PAUSED), docs.errors(
                401, 404, 422, 503, _404="Unknown app or destination, or an app with no destinations")))
def pause(app_id: str, request: Request, destination: str | None = None,
          reason: str = ops.PAUSED_BY_OPERATOR) -> JSONResponse:
    pool, services, now = pool_of(request), services_of(request), now_of(request)
    with pool.connection() as conn, conn.transaction():
        try:
            names = ops.targets(conn, services.policy, app_id, destination)
        except UnknownTarget as exc:
            raise ApiError(404, str(exc)) from None
        ops.pause(conn, app_id, names, now, reason[:500])
    return JSONResponse({"paused": [{"app_id": app_id, "destination": n} for n in names]})


@router.post("/resume/{app_id}", summary="Resume an app's destination(s)",
            responses=docs.responses(docs.ok(RESUMED), docs.errors(
                401, 404, 422, 503, _404="Unknown app or destination")))
def resume(app_id: str, request: Request, destination: str | None = None) -> JSONResponse:
    pool, services = pool_of(request), services_of(request)
    with pool.connection() as conn:
        with conn.transaction():
            try:
                ops.targets(conn, services.policy, app_id, destination, resuming=True)
            except UnknownTarget as exc:
                raise ApiError(404, str(exc)) from None
            resumed = ops.resume(conn, app_id, destination)
        if resumed:
            wake_relay(conn)
    return JSONResponse({"resumed": [{"app_id": a, "destination": d} for a, d in resumed]})
