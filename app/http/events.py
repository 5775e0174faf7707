"""`POST /v1/events`: canonical events, one object or an array, validated as `subledger ingest` validates them.

Every refusal is a 4xx with a JSON body naming the problem; nothing is stored for a refused item.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from subledger.app.canonical import Rejection, to_incoming
from subledger.app.http import docs
from subledger.app.http.common import committer_of, read_body, require_token, services_of
from subledger.core import safejson
from subledger.core.errors import ApiError, PayloadRejected
from subledger.outbox.ingest import Incoming

MAX_BATCH = docs.MAX_BATCH  # events per request; the OpenAPI document states the same limit

router = APIRouter(dependencies=[Depends(require_token)])


@router.post(
    "/v1/events", tags=["ingest"], summary="Ingest canonical events (one object or an array)",
    openapi_extra=docs.EVENTS_BODY,
    responses=docs.responses(docs.EVENTS_OK, docs.errors(
        400, 401, 413, 422, 503,
        _422="A single event that was rejected (`field` names why), or an empty array",
        _413="Body larger than `max_body_bytes`, or an array of more than 1,000 events")),
)
async def post_events(request: Request) -> JSONResponse:
    services = services_of(request)
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

    if accepted:  # shares a transaction with concurrent requests; answered after its commit
        outcomes = await committer_of(request).ingest_async([inc for _, inc in accepted])
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
