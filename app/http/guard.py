"""Refuse, for every route, a path or query text that no PostgreSQL column or query can hold.

`%00` decodes to NUL, which PostgreSQL text refuses: every route that looked a path or query value
up in the database failed with a driver error (a 503 "database unavailable", or on the streamed
`/v1/audit/events` a 200 followed by a broken chunked body). Checking each route's parameters
would miss the next route; this ASGI middleware checks them all before any route runs, and
answers 400 with a JSON body naming the parameter. It is pure ASGI (not `BaseHTTPMiddleware`), so
streamed responses pass through untouched.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from subledger.core.safejson import shown, text_problem


def storable_text(value: str) -> str:
    """A pydantic `AfterValidator` for body fields: NUL or a lone surrogate is a 422 naming the
    field, not a database error (PostgreSQL text cannot hold either)."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def request_text_problem(scope: Scope) -> tuple[str, str] | None:
    """(field, reason) for the first path segment or query parameter that cannot be stored, or None."""
    path = scope.get("path", "")
    problem = text_problem(path)
    if problem is not None:
        return "path", f"the path {problem}"
    query = scope.get("query_string", b"")
    if not query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        for text in (name, value):
            problem = text_problem(text)
            if problem is not None:
                label = shown(name, 40)
                return f"query.{label}", f"query parameter {label!r} {problem}"
    return None


class RefuseUnstorableText:
    """ASGI middleware: 400 for NUL or a lone surrogate in the path or the query string."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = request_text_problem(scope)
            if found is not None:
                field, reason = found
                body: dict[str, Any] = {"error": reason, "field": field}
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
