"""What `/openapi.json` says about the service: error bodies, status codes and request bodies per route.

The handlers answer with hand-built `JSONResponse`s and several parse their raw body themselves (to
store it byte for byte), so FastAPI cannot infer their responses or bodies. They are declared here,
once, and the route decorators name them: a client generator or a schema-driven fuzzer (the suite
runs schemathesis against this document) then sees every status code, header, content type and body
shape that the service really answers with. Schemas are loose where the service is lenient (unknown
fields are kept), strict where it answers with a fixed shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import StreamingResponse

from subledger.core.events import MAX_ID_LENGTH, Environment, EventType, PeriodType, Reason, Source, Store

MAX_BATCH = 1000  # canonical events per `POST /v1/events`; app.http enforces it
BEARER = "bearerAuth"
Responses = dict[int | str, dict[str, Any]]  # the shape of a route decorator's `responses=`


ERROR: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "description": "Every refusal: `error` says what is wrong, `field` names the input at fault, "
                   "`error_id` finds the server's log line (no driver or SQL text is ever answered).",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "field": {"type": "string"}, "error_id": {"type": "string"}},
}


class NDJSONResponse(StreamingResponse):
    """A streamed body of one JSON document per line; declared as the route class so the schema says so."""

    media_type = "application/x-ndjson"


DESCRIPTIONS: dict[int, str] = {
    400: "Malformed body: not JSON (or not what the sender sends), or beyond a parsing limit",
    401: "Missing or wrong credentials (bearer token, signature or Authorization value)",
    403: "Validly signed, but for another bundle id, app or environment",
    404: "Unknown resource, or an app with no credentials for this source",
    405: "Method not allowed on this path; `Allow` lists the methods that are",
    409: "Conflict with the current state (e.g. the message was already delivered)",
    413: "Body larger than `max_body_bytes`, or more items than allowed",
    422: "Well-formed but invalid input; `field` names it",
    424: "A dependency refused our own credentials (the Play Developer API refused the service account)",
    503: "The database (or a store's API) is unavailable; retry after `Retry-After` seconds",
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}


def errors(*codes: int, **described: str) -> Responses:
    """The `responses=` entries for refusals: each code with the JSON error body (503 also with
    `Retry-After`). `described` overrides a description by code, as `_404="..."`."""
    out: Responses = {}
    for code in codes:
        # the content is spelled out (not `model=`): FastAPI would give it the route's media type, and
        # refusals are JSON even where success is NDJSON or text
        entry: dict[str, Any] = {"description": described.get(f"_{code}", DESCRIPTIONS[code]),
                                 "content": {"application/json": {"schema": _ref("Error")}}}
        if code == 503:
            entry["headers"] = RETRY_AFTER
        out[code] = entry
    return out


def ok(schema: dict[str, Any], description: str = "Success", media_type: str = "application/json") -> Responses:
    """The 200 entry with an explicit body schema (handlers return `JSONResponse`s FastAPI cannot read)."""
    return {200: {"description": description, "content": {media_type: {"schema": schema}}}}


def responses(*parts: Responses) -> Responses:
    merged: Responses = {}
    for part in parts:
        merged.update(part)
    return merged


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _string_or_null(**extra: Any) -> dict[str, Any]:
    return {"type": ["string", "null"], **extra}


def _enum(values: type[Any], nullable: bool = True) -> dict[str, Any]:
    listed = [v.value for v in values]
    return {"enum": [*listed, None]} if nullable else {"type": "string", "enum": listed}


STRINGS = {"type": "array", "items": {"type": "string"}}
OBJECT = {"type": "object"}
ANY_OBJECTS = {"type": "array", "items": OBJECT}

CANONICAL_EVENT: dict[str, Any] = {
    "type": "object",
    "title": "CanonicalEvent",
    "description": "One store fact (README, \"The canonical event\"). Unknown fields are kept in the raw payload.",
    "required": ["id", "app_id", "type", "occurred_at"],
    "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH,
               "description": "Idempotency key, unique within `source`"},
        "source": _enum(Source),
        "app_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "type": _enum(EventType, nullable=False),
        "occurred_at": {"type": "string", "format": "date-time", "description": "RFC 3339 with an offset"},
        "subscription_id": _string_or_null(
            maxLength=500, description="Required except for `one_time_purchase`"),
        "app_user_id": _string_or_null(),
        "store": _enum(Store),
        "environment": _enum(Environment),
        "product_id": _string_or_null(description="Required for purchase, renewal, one_time_purchase"),
        "new_product_id": _string_or_null(description="Required for product_change"),
        "period_type": _enum(PeriodType),
        "price": {"type": ["string", "number", "null"], "description": "Decimal string or number"},
        "currency": _string_or_null(pattern="^[A-Za-z]{3}$", description="ISO 4217; required when price ≠ 0"),
        "expires_at": _string_or_null(format="date-time"),
        "transaction_id": _string_or_null(),
        "country_code": _string_or_null(pattern="^[A-Za-z]{2}$"),
        "reason": _enum(Reason),
        "attributes": {"type": ["object", "null"], "description": "Free-form, kept verbatim"},
        "refund_id": _string_or_null(description="On a refund: the store's id of this refund"),
        "purchased_at": _string_or_null(format="date-time",
                                        description="On a refund: when the refunded purchase was made"),
        "is_trial_conversion": {"type": ["boolean", "null"],
                                "description": "On a renewal: the source says the previous period was a trial"},
        "takehome_percentage": {"type": ["string", "number", "null"],
                                "description": "The source's share after commission, 0..1"},
        "aliases": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 100,
                    "description": "Other app user ids of the same user"},
    },
}

EXAMPLE_EVENT = {  # the README's example
    "id": "evt-1", "app_id": "com.example.app", "type": "purchase", "occurred_at": "2026-11-01T10:00:00Z",
    "subscription_id": "1000000001", "app_user_id": "user_1", "store": "app_store", "product_id": "monthly",
    "period_type": "trial", "price": "0", "currency": "USD", "expires_at": "2026-11-08T10:00:00Z",
}

INGEST_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["id", "result", "transitions"],
    "properties": {
        "id": {"type": "string"},
        "result": {"enum": ["new", "duplicate"]},
        "position": {"type": ["integer", "null"]},
        "transitions": STRINGS,
    },
}
REJECTED_ITEM: dict[str, Any] = {
    "type": "object",
    "required": ["result", "reason"],
    "properties": {
        "result": {"const": "rejected"},
        "reason": {"type": "string"},
        "field": {"type": "string"},
        "id": {"type": "string"},
    },
}
BATCH_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["results", "new", "duplicate", "rejected"],
    "properties": {
        "results": {"type": "array", "items": {"anyOf": [_ref("IngestResult"), _ref("RejectedItem")]}},
        "new": {"type": "integer"},
        "duplicate": {"type": "integer"},
        "rejected": {"type": "integer"},
    },
}
WEBHOOK_RESULT: dict[str, Any] = {
    "type": "object",
    "required": ["result", "source", "id", "kind", "transitions"],
    "properties": {
        "result": {"enum": ["new", "duplicate"]},
        "source": {"type": "string"},
        "id": {"type": "string"},
        "kind": {"type": "string"},
        "position": {"type": ["integer", "null"]},
        "transitions": STRINGS,
    },
}

EVENTS_BODY = {
    "requestBody": {
        "required": True,
        "description": f"One canonical event, or an array of 1 to {MAX_BATCH}",
        "content": {"application/json": {"schema": {"anyOf": [
            _ref("CanonicalEvent"),
            {"type": "array", "items": _ref("CanonicalEvent"), "minItems": 1, "maxItems": MAX_BATCH},
        ]}, "example": EXAMPLE_EVENT}},
    }
}
EVENTS_OK = ok({"anyOf": [_ref("IngestResult"), _ref("BatchResult")]},
               "The result of the one event, or one result per item of an array")


def raw_body(schema: dict[str, Any], description: str, *headers: tuple[str, str]) -> dict[str, Any]:
    """`openapi_extra` for a webhook that reads its raw body itself (its signature covers the bytes)."""
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "description": description,
                        "content": {"application/json": {"schema": schema}}},
    }
    if headers:
        extra["parameters"] = [
            {"name": name, "in": "header", "required": False, "schema": {"type": "string"}, "description": text}
            for name, text in headers
        ]
    return extra


APPLE_BODY = raw_body(
    {"type": "object", "required": ["signedPayload"], "properties": {"signedPayload": {"type": "string"}}},
    "App Store Server Notification V2: a compact JWS signed by Apple",
)
STRIPE_BODY = raw_body(
    {"type": "object", "required": ["id", "type"], "properties": {
        "id": {"type": "string"}, "object": {"const": "event"}, "type": {"type": "string"},
        "created": {"type": "integer"}, "livemode": {"type": "boolean"},
        "data": {"type": "object", "properties": {"object": OBJECT}},
    }},
    "A Stripe event object, verified byte for byte against `Stripe-Signature`",
    ("Stripe-Signature", "`t=<unix time>,v1=<hex HMAC-SHA256>` over the raw body"),
)
REVENUECAT_BODY = raw_body(
    {"type": "object", "required": ["event"], "properties": {
        "api_version": {"type": "string"},
        "event": {"type": "object", "properties": {
            "id": {"type": "string"}, "type": {"type": "string"}, "app_user_id": {"type": "string"},
        }},
    }},
    "A RevenueCat webhook: `{\"api_version\", \"event\": {...}}`",
    ("Authorization", "The value configured for this app's RevenueCat webhook"),
)
GOOGLE_BODY = raw_body(
    {"type": "object", "required": ["message"], "properties": {
        "subscription": {"type": "string"},
        "message": {"type": "object", "properties": {
            "data": {"type": "string", "contentEncoding": "base64",
                     "description": "base64 of a DeveloperNotification"},
            "messageId": {"type": "string"}, "publishTime": {"type": "string"},
            "attributes": {"type": "object"},
        }},
    }},
    "A Pub/Sub push envelope carrying a Real-time developer notification",
    ("Authorization", "`Bearer <OIDC token>` Pub/Sub signs, when push authentication is configured"),
)

READY: dict[str, Any] = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "pending": {"type": "integer"},
        "dead": {"type": "integer"},
        "oldest_pending_seconds": {"type": "number"},
        "paused_destinations": ANY_OBJECTS,
        "rate_limited_destinations": ANY_OBJECTS,
        "failing_destinations": ANY_OBJECTS,
    },
}
NOT_READY: Responses = {503: {
    "description": "Not ready: the database cannot be reached",
    "headers": RETRY_AFTER,
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"const": "unavailable"}, "error": {"type": "string"},
                       "error_id": {"type": "string"}},
    }}},
}}
METRICS_OK = ok({"type": "string"}, "Prometheus text exposition format", "text/plain")
NDJSON_OK = ok(OBJECT, "One log entry per line (raw body and facts included), in log order", "application/x-ndjson")
DOCUMENT_OK = ok(OBJECT, "The same JSON document as `subledger audit ... --json`")
RETRY_OK = ok({"type": "object", "required": ["requeued", "rerendered", "still_dead"], "properties": {
    "requeued": STRINGS, "rerendered": STRINGS, "still_dead": ANY_OBJECTS}})
DESTINATIONS = {"type": "array", "items": {"type": "object", "required": ["app_id", "destination"], "properties": {
    "app_id": {"type": "string"}, "destination": {"type": "string"}}}}
LINKED_OK = ok({"type": "object", "required": ["app_user_id", "app_id", "subscription_key", "identify"],
                "properties": {"app_user_id": {"type": "string"}, "app_id": {"type": "string"},
                               "subscription_key": {"type": "string"},
                               "previous_app_user_id": {"type": ["string", "null"]}, "identify": STRINGS}})
LINKS_OK = ok({"type": "object", "required": ["app_user_id", "links"], "properties": {
    "app_user_id": {"type": "string"}, "links": ANY_OBJECTS}})

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": ERROR,
    "CanonicalEvent": CANONICAL_EVENT,
    "IngestResult": INGEST_RESULT,
    "RejectedItem": REJECTED_ITEM,
    "BatchResult": BATCH_RESULT,
}


def install(app: FastAPI) -> None:
    """Serve the document with the shared schemas and the bearer scheme, which every `/v1` route needs
    (routers declare the token check once as a dependency; the document says so once, here)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
            components = doc.setdefault("components", {})
            components.setdefault("schemas", {}).update(COMPONENTS)
            components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer",
                                                      "description": "The configured `api_token`"}}
            for path, operations in doc.get("paths", {}).items():
                for operation in operations.values():
                    if path.startswith("/v1/"):
                        operation["security"] = [{BEARER: []}]
                    # app.http.guard refuses NUL / lone surrogates in any path or query, before routing
                    operation["responses"].setdefault("400", {
                        "description": "A NUL character or a lone surrogate in the path or query string",
                        "content": {"application/json": {"schema": _ref("Error")}},
                    })
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
