"""Store webhooks: bytes in, the adapter's `Notification` to `ingest`, the raw body stored verbatim.

Each endpoint authenticates by the source's own mechanism (Apple's signed JWS, `Stripe-Signature`,
RevenueCat's static `Authorization` value, Pub/Sub's OIDC push token when configured; Google
Play's state is then fetched from the Play Developer API). 200 answers an accepted or duplicate
delivery (the store then stops retrying); every refusal is a 4xx with a JSON reason and stores
nothing:

    400 malformed body · 401 bad signature or credentials · 403 signed, but for another
    bundle / app / environment · 404 an app with no credentials for this source · 413 too large ·
    422 a well-formed body that states an impossible fact · 424 the Play Developer API refused our
    service account. A database outage (or Apple's OCSP responder, or the Play Developer API, out of
    reach) is a 503 with `Retry-After` (`refusal`, the one rule for every source).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from subledger.app import google_api
from subledger.app.bootstrap import Services
from subledger.app.http import docs
from subledger.app.http.common import read_body, retry_after
from subledger.app.sources import Sources, StripeLinks, build_sources
from subledger.core.errors import (
    BadSignature,
    CredentialsRefused,
    InvalidEvent,
    MalformedPayload,
    PayloadRejected,
    SourceUnavailable,
    Transient,
    UnknownApp,
)
from subledger.core.sources import Notification, refuse_unstorable
from subledger.core.sources import revenuecat as revenuecat_source
from subledger.outbox.group_commit import GroupCommit
from subledger.outbox.identify import apply_transfer
from subledger.outbox.ingest import Incoming, Outcome, wake_relay

log = logging.getLogger("subledger.webhooks")
WRONG_TARGET_FIELDS = frozenset({"bundleId", "appAppleId", "environment"})
WEBHOOK_OK = docs.ok(docs.WEBHOOK_RESULT, "Accepted (`new`) or repeated (`duplicate`): the store stops retrying")


# A Transient refusal (Apple's OCSP, the Play API, RVS or an SNS certificate out of reach) asks the
# sender to come back: 30 s is past our own retries of the source's API, and below the stores'
# redelivery backoffs, so the header costs them nothing and tells a proxy or a person when to retry.
TRANSIENT_RETRY_AFTER_SECONDS = 30


def status_for(exc: PayloadRejected | SourceUnavailable) -> int:
    if isinstance(exc, Transient):
        return 503  # e.g. online (OCSP) checks could not reach Apple: not the sender's fault, retry
    if isinstance(exc, CredentialsRefused):
        return 424  # our service account, not the sender: Pub/Sub redelivers until it is fixed
    if isinstance(exc, UnknownApp):
        return 404
    if isinstance(exc, BadSignature):
        return 403 if exc.field in WRONG_TARGET_FIELDS else 401
    if isinstance(exc, MalformedPayload):
        return 400
    if isinstance(exc, InvalidEvent):
        return 422
    return 400


def refusal(exc: PayloadRejected | SourceUnavailable) -> JSONResponse:
    """The one place a webhook's refusal becomes an answer, so one rule holds for every source: a
    Transient one is a 503 *with* `Retry-After` (as the database's 503s are), the rest a 4xx."""
    body: dict[str, Any]
    if isinstance(exc, PayloadRejected):
        body = {"error": exc.reason}
        if exc.field:
            body["field"] = exc.field
    else:
        body = {"error": str(exc)}
    headers = retry_after(TRANSIENT_RETRY_AFTER_SECONDS) if isinstance(exc, Transient) else None
    return JSONResponse(body, status_code=status_for(exc), headers=headers)


def parse(call: Callable[[], Notification]) -> Notification | JSONResponse:
    """Run an adapter: its refusals become 4xx. Anything else it raises propagates: a failed log
    lookup is a 503 (StoreError), and a bug in the adapter is a 500 with an error id and its
    traceback in the log (create_app's handler), never a 4xx: a 4xx would tell the store to give up
    on a delivery we could not read, so it would be lost; a 5xx makes it deliver again once fixed."""
    try:
        notification = call()
        # NUL, lone surrogates, numbers beyond 64 bits: refused here (422) rather than failing the insert
        refuse_unstorable(notification)
    except PayloadRejected as exc:
        return refusal(exc)
    return notification


def accepted(outcome: Outcome, notification: Notification) -> JSONResponse:
    return JSONResponse(
        {
            "result": outcome.result,
            "source": outcome.source,
            "id": outcome.external_id,
            "kind": notification.kind,
            "position": outcome.position,
            "transitions": list(outcome.transitions),
        }
    )


def webhook_router(
    services: Services, pool: ConnectionPool, committer: GroupCommit, sources: Sources | None = None
) -> APIRouter:
    """The webhook endpoints over the service's pool; builds (and so validates) the adapters once.

    Reads (links, redeliveries) take a pooled connection; every append goes through `committer`,
    which shares one transaction among concurrent deliveries (outbox/group_commit.py)."""
    adapters = sources if sources is not None else build_sources(services.settings)
    router = APIRouter(tags=["webhooks"])

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        # no free connection (or no database) within database_timeout_seconds: 503, and the store retries
        with pool.connection() as conn:
            yield conn

    def store(notification: Notification, raw: bytes) -> JSONResponse:
        (outcome,) = committer.ingest([Incoming(notification, raw)])
        return accepted(outcome, notification)

    def apple(raw: bytes) -> JSONResponse:
        notification = parse(lambda: adapters.parse_apple(raw))
        return notification if isinstance(notification, JSONResponse) else store(notification, raw)

    def stripe(app_id: str, raw: bytes, signature: str | None) -> JSONResponse:
        try:
            adapters.stripe_for(app_id)
        except PayloadRejected as exc:
            return refusal(exc)
        with connection() as conn:
            links = StripeLinks(conn, app_id)
            notification = parse(lambda: adapters.parse_stripe(app_id, raw, signature, services.clock(), links))
        return notification if isinstance(notification, JSONResponse) else store(notification, raw)

    def revenuecat(app_id: str, raw: bytes, authorization: str | None) -> JSONResponse:
        notification = parse(lambda: adapters.parse_revenuecat(app_id, raw, authorization))
        if isinstance(notification, JSONResponse):
            return notification
        response = store(notification, raw)
        if notification.kind == "TRANSFER":
            transfer(notification.app_id, raw)
        return response

    def google(raw: bytes, headers: dict[str, str]) -> JSONResponse:
        """Parse, route by package name, check the push token, answer a redelivery from the log, else
        fetch the state from Google (no connection held meanwhile), map and ingest."""
        try:
            push = google_api.parse_push(raw, google_api.message_id_header(headers))
            adapter = adapters.google_for(push.package_name)
            adapter.verify_push(headers.get("authorization"))
        except PayloadRejected as exc:
            return refusal(exc)
        except SourceUnavailable as exc:
            return refusal(exc)
        app_id = adapter.config.app_id
        with connection() as conn:
            seen = google_api.already_logged(conn, push.external_id)
        if seen:
            return store(google_api.duplicate_of(push, app_id), raw)
        try:
            fetched = adapter.fetch(push)
        except PayloadRejected as exc:
            return refusal(exc)
        except SourceUnavailable as exc:
            log.warning("Google Play state not fetched for message %s: %s", push.external_id, exc)
            return refusal(exc)
        with connection() as conn:
            links = google_api.GoogleLinks(conn, app_id)
            notification = parse(lambda: adapter.notification(push, chain=links, fetched=fetched))
        return notification if isinstance(notification, JSONResponse) else store(notification, raw)

    def transfer(app_id: str, raw: bytes) -> None:
        """TRANSFER: the sender's subscriptions now belong to the receiver, linked and told as the links
        API does (`apply_transfer`); also on a duplicate delivery, so a crash between the log commit
        and the links heals when RevenueCat retries. Links are idempotent."""
        moved = revenuecat_source.transfer_links(raw)
        if moved is None:
            return
        with connection() as conn:
            if apply_transfer(conn, app_id, moved, services.policy.destinations_for(app_id), services.clock()):
                wake_relay(conn)

    @router.post(
        "/webhooks/apple",
        summary="App Store Server Notifications V2 (all apps; routed by the signed bundle id)",
        openapi_extra=docs.APPLE_BODY,
        responses=docs.responses(WEBHOOK_OK, docs.errors(400, 401, 403, 404, 413, 422, 503)),
    )
    async def post_apple(request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(apple, raw)

    @router.post(
        "/webhooks/stripe/{app_id}",
        summary="Stripe webhook endpoint of one app (Stripe-Signature checked on the raw body)",
        openapi_extra=docs.STRIPE_BODY,
        responses=docs.responses(WEBHOOK_OK, docs.errors(400, 401, 403, 404, 413, 422, 503)),
    )
    async def post_stripe(app_id: str, request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(stripe, app_id, raw, request.headers.get("stripe-signature"))

    @router.post(
        "/webhooks/revenuecat/{app_id}",
        summary="RevenueCat webhook of one app (the configured Authorization value)",
        openapi_extra=docs.REVENUECAT_BODY,
        responses=docs.responses(WEBHOOK_OK, docs.errors(400, 401, 403, 404, 413, 422, 503)),
    )
    async def post_revenuecat(app_id: str, request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(revenuecat, app_id, raw, request.headers.get("authorization"))

    @router.post(
        "/webhooks/google",
        summary="Google Play Real-time developer notifications (Pub/Sub push; routed by package name)",
        openapi_extra=docs.GOOGLE_BODY,
        responses=docs.responses(WEBHOOK_OK, docs.errors(400, 401, 403, 404, 413, 422, 424, 503)),
    )
    async def post_google(request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(google, raw, dict(request.headers))

    return router


