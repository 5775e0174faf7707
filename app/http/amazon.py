"""POST /webhooks/amazon: Amazon Appstore Real-time Notifications, delivered by Amazon SNS.

One endpoint for every Amazon app, routed by the notification's `appPackageName` (then checked by
that app's SNS verifier, as Apple's endpoint routes by the bundle id the body claims). The answers
are the other webhooks' (`webhooks.status_for`): 200 new or duplicate · 400 malformed · 401 bad
signature · 403 signed for another SNS topic · 404 no app for the package · 413 · 422 impossible
facts · 424 RVS refused the shared secret · 503 (with Retry-After) SNS certificates, RVS or the
database out of reach. Amazon retries a delivery only on a 5xx or no answer (never on a 4xx), so
only what a retry can fix is a 5xx; the README says what to do after a 424.

A `SubscriptionConfirmation` (sent when the endpoint is added in the Developer Console) is
verified, then confirmed by GETting its `SubscribeURL` (on an SNS host only); its `Token` is logged
and answered too, for a console that asks for it. Nothing is stored for either kind of confirmation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from subledger.app import amazon_api
from subledger.app.bootstrap import Services
from subledger.app.http import docs
from subledger.app.http.common import read_body
from subledger.app.http.webhooks import WEBHOOK_OK, accepted, parse, refusal
from subledger.app.sources import Sources
from subledger.core.errors import BadSignature, PayloadRejected, SourceUnavailable
from subledger.core.sources import Notification
from subledger.core.sources import amazon as amazon_source
from subledger.outbox.group_commit import GroupCommit
from subledger.outbox.ingest import Incoming

log = logging.getLogger("subledger.webhooks")

AMAZON_BODY = docs.raw_body(
    {"type": "object", "required": ["Type", "MessageId", "Message", "Signature", "SigningCertURL"], "properties": {
        "Type": {"enum": ["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]},
        "MessageId": {"type": "string"}, "TopicArn": {"type": "string"}, "Timestamp": {"type": "string"},
        "Message": {"type": "string", "description": "JSON text of the RTN message (appPackageName, "
                    "notificationType, appUserId, receiptId, relatedReceipts, timestamp, betaProductTransaction)"},
        "SignatureVersion": {"enum": ["1", "2"]}, "Signature": {"type": "string"},
        "SigningCertURL": {"type": "string"}, "SubscribeURL": {"type": "string"}, "Token": {"type": "string"},
    }},
    "An Amazon SNS message carrying an Amazon Appstore Real-time Notification (or a subscription confirmation)",
)


def amazon_router(services: Services, pool: ConnectionPool, committer: GroupCommit, adapters: Sources) -> APIRouter:
    """The Amazon endpoint over the adapters `create_app` built once for every webhook."""
    router = APIRouter(tags=["webhooks"])

    @contextmanager
    def connection() -> Iterator[psycopg.Connection]:
        with pool.connection() as conn:
            yield conn

    def unavailable(exc: SourceUnavailable) -> JSONResponse:
        log.warning("Amazon delivery not processed: %s", exc)
        return refusal(exc)  # a 503 with Retry-After, as every webhook's Transient refusal

    def store(notification: Notification, raw: bytes) -> JSONResponse:
        (outcome,) = committer.ingest([Incoming(notification, raw)])
        return accepted(outcome, notification)

    def confirmation(envelope: amazon_source.Envelope) -> JSONResponse:
        try:
            verifier = adapters.amazon_confirmation()
            verifier.verify(envelope, services.clock())
            confirmed = envelope.type == "SubscriptionConfirmation" and verifier.confirm_subscription(envelope)
        except PayloadRejected as exc:
            return refusal(exc)
        except SourceUnavailable as exc:
            return unavailable(exc)
        token = envelope.get("Token")
        log.warning("Amazon SNS %s for topic %s (confirmed: %s); Token: %s", envelope.type, envelope.topic_arn,
                    confirmed, token)
        result = "confirmed" if confirmed else "received"
        return JSONResponse({"result": result, "type": envelope.type, "topic": envelope.topic_arn, "token": token})

    def amazon(raw: bytes) -> JSONResponse:
        """Parse, route by package, verify the signature, answer a redelivery from the log, else
        fetch the receipt from RVS (no connection held meanwhile), map and ingest."""
        try:
            envelope = amazon_source.parse_envelope(raw)
            if envelope.type in amazon_source.CONFIRMATIONS:
                return confirmation(envelope)
            rtn = amazon_source.parse_notification(envelope)
            adapter = adapters.amazon_for(rtn.package_name)
            adapter.verify(envelope, services.clock())
        except BadSignature as exc:
            if exc.field == "TopicArn":
                return JSONResponse({"error": exc.reason, "field": exc.field}, status_code=403)
            return refusal(exc)
        except PayloadRejected as exc:
            return refusal(exc)
        except SourceUnavailable as exc:
            return unavailable(exc)
        app_id = adapter.config.app_id
        with connection() as conn:
            seen = amazon_api.already_logged(conn, rtn.external_id)
        if seen:
            return store(amazon_api.duplicate_of(rtn, app_id), raw)
        try:
            fetched = adapter.fetch(rtn)
        except PayloadRejected as exc:  # CredentialsRefused (424) included
            return refusal(exc)
        except SourceUnavailable as exc:
            return unavailable(exc)
        with connection() as conn:
            links = amazon_api.ReceiptLinks(conn, app_id)
            notification = parse(lambda: adapter.notification(rtn, chain=links, fetched=fetched))
        return notification if isinstance(notification, JSONResponse) else store(notification, raw)

    @router.post(
        "/webhooks/amazon",
        summary="Amazon Appstore Real-time Notifications (Amazon SNS; routed by the app's package name)",
        openapi_extra=AMAZON_BODY,
        responses=docs.responses(
            WEBHOOK_OK,
            docs.errors(400, 401, 403, 404, 413, 422, 424, 503)),
    )
    async def post_amazon(request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(amazon, raw)

    return router
