"""`/v1/outbox/...` and `/v1/subscribers/.../links`: outbox operations and identity linking over HTTP.

The same operations as `subledger outbox ...`; every route needs the bearer token (declared once
per router). Request bodies are small JSON objects, refused over the configured size limit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from subledger.app import http_docs as docs
from subledger.app.auth import require_token
from subledger.app.http import ApiError
from subledger.app.http_guard import storable_text
from subledger.core.events import Store
from subledger.outbox import ops
from subledger.outbox.identify import link as link_subscription
from subledger.outbox.ingest import wake_relay
from subledger.store import audit, identity
from subledger.store.db import translate_errors

outbox_router = APIRouter(prefix="/v1/outbox", tags=["outbox"], dependencies=[Depends(require_token)])
subscribers_router = APIRouter(prefix="/v1/subscribers", tags=["identity"], dependencies=[Depends(require_token)])
ROWS = {"type": "object", "required": ["rows"], "properties": {"rows": docs.ANY_OBJECTS}}
PAUSED = {"type": "object", "required": ["paused"], "properties": {"paused": docs.DESTINATIONS}}
RESUMED = {"type": "object", "required": ["resumed"], "properties": {"resumed": docs.DESTINATIONS}}


def _ctx(request: Request) -> tuple[Any, Any, datetime]:
    services = request.app.state.services
    return request.app.state.pool, services, services.clock()


def _size_limit(request: Request) -> None:
    limit = request.app.state.services.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body larger than {limit} bytes")


@outbox_router.get("", summary="Rows waiting in the outbox",
                   responses=docs.responses(docs.ok(ROWS), docs.errors(401, 422, 503)))
def list_outbox(
    request: Request, status: Literal["pending", "dead"] | None = None, app_id: str | None = None, limit: int = 100
) -> JSONResponse:
    if not 1 <= limit <= 10_000:
        raise ApiError(422, "limit must be between 1 and 10000", field="limit")
    pool, _, _ = _ctx(request)
    with translate_errors(), pool.connection() as conn:
        rows = ops.list_rows(conn, status=status, app_id=app_id, limit=limit)
    return JSONResponse({"rows": audit.jsonable(rows)})


def _retry(request: Request, ref: str | None, dead: bool) -> JSONResponse:
    pool, services, now = _ctx(request)
    with translate_errors(), pool.connection() as conn:
        try:
            with conn.transaction():
                result = ops.retry(conn, services.policy, now, ref=ref, dead=dead)
        except ops.NotFound as exc:
            raise ApiError(409 if exc.delivered else 404, str(exc)) from None
        if result.requeued:
            wake_relay(conn)
    return JSONResponse(result.as_json())


@outbox_router.post("/dead/retry", summary="Retry every dead row",
                    responses=docs.responses(docs.RETRY_OK, docs.errors(401, 503)))
def retry_dead(request: Request) -> JSONResponse:
    return _retry(request, None, True)


@outbox_router.post("/{ref}/retry", summary="Retry one row (outbox id or messageId), keeping its messageId",
                    responses=docs.responses(docs.RETRY_OK, docs.errors(
                        401, 404, 409, 422, 503, _404="No outbox row has this id or messageId",
                        _409="The message was already delivered")))
def retry_one(ref: str, request: Request) -> JSONResponse:
    return _retry(request, ref, False)


@outbox_router.post("/pause/{app_id}", summary="Pause an app's destination(s) until resumed",
                    responses=docs.responses(docs.ok(PAUSED), docs.errors(
                        401, 404, 422, 503, _404="Unknown app or destination, or an app with no destinations")))
def pause(app_id: str, request: Request, destination: str | None = None,
          reason: str = ops.PAUSED_BY_OPERATOR) -> JSONResponse:
    pool, services, now = _ctx(request)
    with translate_errors(), pool.connection() as conn, conn.transaction():
        try:
            names = ops.targets(conn, services.policy, app_id, destination)
        except ops.UnknownTarget as exc:
            raise ApiError(404, str(exc)) from None
        ops.pause(conn, app_id, names, now, reason[:500])
    return JSONResponse({"paused": [{"app_id": app_id, "destination": n} for n in names]})


@outbox_router.post("/resume/{app_id}", summary="Resume an app's destination(s)",
                    responses=docs.responses(docs.ok(RESUMED), docs.errors(
                        401, 404, 422, 503, _404="Unknown app or destination")))
def resume(app_id: str, request: Request, destination: str | None = None) -> JSONResponse:
    pool, services, _ = _ctx(request)
    with translate_errors(), pool.connection() as conn:
        with conn.transaction():
            try:
                ops.targets(conn, services.policy, app_id, destination, resuming=True)
            except ops.UnknownTarget as exc:
                raise ApiError(404, str(exc)) from None
            resumed = ops.resume(conn, app_id, destination)
        if resumed:
            wake_relay(conn)
    return JSONResponse({"resumed": [{"app_id": a, "destination": d} for a, d in resumed]})


class LinkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_id: Annotated[str, AfterValidator(storable_text)] = Field(min_length=1, max_length=500)
    subscription_id: Annotated[str, AfterValidator(storable_text)] = Field(min_length=1, max_length=500)
    store: Store


@subscribers_router.post(
    "/{app_user_id}/links",
    summary="Link a store subscription to an app user: later messages are attributed to the user",
    dependencies=[Depends(_size_limit)],
    responses=docs.responses(docs.LINKED_OK, docs.errors(401, 400, 413, 422, 503, _400="The body is not JSON")),
)
async def link(app_user_id: str, body: LinkBody, request: Request) -> JSONResponse:
    if not app_user_id.strip() or len(app_user_id) > 500:
        raise ApiError(422, "app_user_id must be 1 to 500 characters", field="app_user_id")
    pool, services, now = _ctx(request)
    if not services.settings.knows(body.app_id):
        raise ApiError(422, f"app {body.app_id!r} is not configured", field="app_id")
    key = f"{body.app_id}/{body.store.value}/{body.subscription_id}"

    def run() -> tuple[str | None, list[str]]:
        with translate_errors(), pool.connection() as conn:
            with conn.transaction():
                previous, sent = link_subscription(
                    conn, body.app_id, key, app_user_id, services.policy.destinations_for(body.app_id), now
                )
            if sent:
                wake_relay(conn)
            return previous, sent

    previous, sent = await run_in_threadpool(run)
    return JSONResponse({"app_user_id": app_user_id, "app_id": body.app_id, "subscription_key": key,
                         "previous_app_user_id": previous, "identify": sent})


@subscribers_router.get("/{app_user_id}/links", summary="The store subscriptions linked to an app user",
                        responses=docs.responses(docs.LINKS_OK, docs.errors(401, 422, 503)))
def links(app_user_id: str, request: Request) -> JSONResponse:
    pool, _, _ = _ctx(request)
    with translate_errors(), pool.connection() as conn:
        found = identity.links_of(conn, app_user_id)
    return JSONResponse({"app_user_id": app_user_id, "links": [
        {"app_id": a, "subscription_key": k, "linked_at": audit.jsonable(t)} for a, k, t in found]})
