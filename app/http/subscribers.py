"""`/v1/subscribers/{app_user_id}/links`: link a store subscription to an app user, list the links.

The same operation as RevenueCat's TRANSFER (`outbox.identify`); every route needs the bearer
token (declared once, on the router). The body is a small JSON object, refused over the size limit.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from subledger.app.http import docs
from subledger.app.http.common import now_of, pool_of, require_token, services_of, size_limit
from subledger.app.http.guard import storable_text
from subledger.core.errors import ApiError
from subledger.core.events import Store
from subledger.outbox.identify import link as link_subscription
from subledger.outbox.ingest import wake_relay
from subledger.store import audit, identity

router = APIRouter(prefix="/v1/subscribers", tags=["identity"], dependencies=[Depends(require_token)])


class LinkBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_id: Annotated[str, AfterValidator(storable_text)] = Field(min_length=1, max_length=500)
    subscription_id: Annotated[str, AfterValidator(storable_text)] = Field(min_length=1, max_length=500)
    store: Store


@router.post(
    "/{app_user_id}/links",
    summary="Link a store subscription to an app user: later messages are attributed to the user",
    dependencies=[Depends(size_limit)],
    responses=docs.responses(docs.LINKED_OK, docs.errors(401, 400, 413, 422, 503, _400="The body is not JSON")),
)
async def link(app_user_id: str, body: LinkBody, request: Request) -> JSONResponse:
    if not app_user_id.strip() or len(app_user_id) > 500:
        raise ApiError(422, "app_user_id must be 1 to 500 characters", field="app_user_id")
    pool, services, now = pool_of(request), services_of(request), now_of(request)
    if not services.settings.knows(body.app_id):
        raise ApiError(422, f"app {body.app_id!r} is not configured", field="app_id")
    key = f"{body.app_id}/{body.store.value}/{body.subscription_id}"

    def run() -> tuple[str | None, list[str]]:
        with pool.connection() as conn:
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


@router.get("/{app_user_id}/links", summary="The store subscriptions linked to an app user",
            responses=docs.responses(docs.LINKS_OK, docs.errors(401, 422, 503)))
def links(app_user_id: str, request: Request) -> JSONResponse:
    pool = pool_of(request)
    with pool.connection() as conn:
        found = identity.links_of(conn, app_user_id)
    return JSONResponse({"app_user_id": app_user_id, "links": [
        {"app_id": a, "subscription_key": k, "linked_at": audit.jsonable(t)} for a, k, t in found]})
