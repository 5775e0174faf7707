"""`/healthz`, `/readyz`, `/metrics`: is the process up, can it reach its database, what has it done.

No token: a load balancer and a Prometheus scraper ask these. `/readyz` is the one that reads the
database (a 503 when it cannot); `/metrics` serves the process counters even then. `/readyz` is
"degraded" (still a 200) while a destination is paused or failing, or while reconciliation recovered
more than `[reconciliation] gap_threshold` facts for an app and source in the last 24 h
(`reconciliation_gaps`: the push channel lost them; README: Reconciliation).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from subledger.app.http import docs
from subledger.app.http.common import database_refusal, pool_of, services_of
from subledger.app.reconcile_schedule import gaps as reconciliation_gaps
from subledger.core.errors import StoreError
from subledger.outbox.metrics import CONTENT_TYPE, outbox_exposition, process_exposition
from subledger.store import outbox as outbox_store

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=docs.ok(
    {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}, "The process is up"))
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=docs.responses(docs.ok(docs.READY), docs.NOT_READY))
def readyz(request: Request) -> JSONResponse:
    services = services_of(request)
    try:
        with pool_of(request).connection() as conn:
            found = outbox_store.readiness(conn)
            gaps = reconciliation_gaps(conn, services.settings, services.clock())
    except StoreError as exc:  # the database unreachable or failing means not ready (a bug is a 500)
        refusal, headers = database_refusal(exc, services.database_timeout)
        return JSONResponse({"status": "unavailable", **refusal}, status_code=503, headers=headers)
    body = {
        "status": "degraded" if found.paused or found.failing or gaps else "ok",
        "pending": found.pending,
        "dead": found.dead,
        "oldest_pending_seconds": found.oldest_pending_seconds,
        "paused_destinations": [
            {"app_id": a, "destination": d, "reason": r, "since": t.isoformat() if t else None}
            for a, d, r, t in found.paused
        ],
        "rate_limited_destinations": [
            {"app_id": a, "destination": d, "until": t.isoformat()} for a, d, t in found.rate_limited
        ],
        "failing_destinations": [  # the relay holds their backlog behind one probe until one answers
            {"app_id": f.app_id, "destination": f.destination, "since": f.since.isoformat(),
             "failures": f.failures, "reason": f.reason}
            for f in found.failing
        ],
        "reconciliation_gaps": gaps,  # app_id, source, recovered_last_24h: what push never delivered
    }
    return JSONResponse(body, status_code=200)


@router.get("/metrics", response_class=Response, responses=docs.METRICS_OK)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: this process's relay counters + outbox gauges read now."""
    services = services_of(request)
    body = process_exposition()
    try:
        with pool_of(request).connection() as conn:
            known = [(a, d) for a, app_ in services.settings.apps.items() for d in app_.destinations]
            body += outbox_exposition(conn, known)
    except StoreError as exc:  # the counters are still worth serving without the database
        refusal, _ = database_refusal(exc, services.database_timeout)
        body += f"# outbox gauges unavailable: {refusal['error']} (error_id {refusal['error_id']})\n".encode()
    return Response(body, media_type=CONTENT_TYPE)
