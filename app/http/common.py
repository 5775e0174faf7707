"""What every router of the HTTP service shares: the request context, the error shape and the bearer check.

One home, so that no router reads the pool, the clock or the body limit its own way, no route can
check the token differently (or forget to: routers declare `require_token` once for all their
routes), and every refusal has the same JSON body. Routers import this module; it imports no router.
"""

from __future__ import annotations

import hmac
import logging
import math
import uuid
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool
from starlette.exceptions import HTTPException as StarletteHTTPException

from subledger.app.bootstrap import Services
from subledger.app.wording import validation_reason
from subledger.core.errors import ApiError, StoreError, StoreUnavailable
from subledger.outbox.group_commit import GroupCommit

log = logging.getLogger("subledger.http")


# -- the request context: what `create_app` put on `app.state` --------------------------------------


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def pool_of(request: Request) -> ConnectionPool:
    pool: ConnectionPool = request.app.state.pool
    return pool


def committer_of(request: Request) -> GroupCommit:
    """The service's group commit: every append goes through it (outbox/group_commit.py)."""
    committer: GroupCommit = request.app.state.committer
    return committer


def now_of(request: Request) -> datetime:
    """The service's clock (tests inject one), never the wall clock directly."""
    return services_of(request).clock()


# -- the bearer token ---------------------------------------------------------------------------


def check_token(expected: str | None, header: str) -> None:
    """Raise a 401 ApiError unless `header` is `Bearer <expected>`, compared in constant time."""
    scheme, _, token = header.partition(" ")
    if not expected:
        raise ApiError(401, "no API token is configured on the server; set SUBLEDGER_API_TOKEN")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "missing or wrong bearer token")


def require_token(request: Request) -> None:
    """FastAPI dependency: the app's configured `api_token` must be presented as a bearer token."""
    check_token(services_of(request).settings.api_token, request.headers.get("authorization", ""))


# -- request bodies -----------------------------------------------------------------------------


def size_limit(request: Request) -> None:
    """FastAPI dependency: a declared body over `max_body_bytes` is a 413 before it is read."""
    limit = services_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body larger than {limit} bytes")


async def read_body(request: Request) -> bytes:
    """The raw body, refused (413) as soon as it passes `max_body_bytes`, declared or not."""
    size_limit(request)
    limit = services_of(request).settings.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- errors -------------------------------------------------------------------------------------


def database_refusal(exc: BaseException, seconds: float) -> tuple[dict[str, str], dict[str, str]]:
    """Body and headers of a 503 for a database failure: the detail goes to the log under an id,
    the client gets the id and no driver or SQL text (it can hold table names, values, hosts)."""
    error_id = uuid.uuid4().hex[:16]
    unavailable = isinstance(exc, StoreUnavailable)
    log.warning("%s [error_id=%s]: %s", "database unavailable" if unavailable else "database error",
                error_id, " ".join(str(exc).split()) or type(exc).__name__, extra={"error_id": error_id})
    body = {"error": "database unavailable" if unavailable else "database error", "error_id": error_id}
    return body, retry_after(seconds)


def retry_after(seconds: float) -> dict[str, str]:
    """The `Retry-After` header every 503 carries (RFC 9110: whole seconds, at least 1), so a client
    or proxy that honours it never retries at once and never is told 0."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal a JSON body: ApiError as raised, framework errors in the project's words, the
    database a 503 with Retry-After, a bug a 500 with an error id (its traceback is in the log)."""

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
        reason = validation_reason(first) if first else "invalid request"
        return JSONResponse({"error": f"{loc.split('.')[-1]}: {reason}" if loc else reason, "field": loc},
                            status_code=422)

    @app.exception_handler(StoreError)  # store/db.py translated every driver error (PoolTimeout too)
    async def _store_error(request: Request, exc: Exception) -> JSONResponse:
        body, headers = database_refusal(exc, services_of(request).database_timeout)
        return JSONResponse(body, status_code=503, headers=headers)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        """A bug is a 500 with an id to find its traceback in the log, never the exception's text."""
        error_id = uuid.uuid4().hex[:16]
        log.error("unhandled error [error_id=%s]", error_id, exc_info=exc, extra={"error_id": error_id})
        return JSONResponse({"error": "internal error", "error_id": error_id}, status_code=500)
