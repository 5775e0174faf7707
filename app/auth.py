"""The bearer-token check every `/v1` route shares, as a FastAPI dependency.

One implementation, compared in constant time, so no route can be added that checks differently
(or forgets to: routers declare it once for all their routes).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from subledger.app.http import ApiError


def check_token(expected: str | None, header: str) -> None:
    """Raise a 401 ApiError unless `header` is `Bearer <expected>`."""
    scheme, _, token = header.partition(" ")
    if not expected:
        raise ApiError(401, "no API token is configured on the server; set SUBLEDGER_API_TOKEN")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "missing or wrong bearer token")


def require_token(request: Request) -> None:
    """FastAPI dependency: the app's configured `api_token` must be presented as a bearer token."""
    check_token(request.app.state.services.settings.api_token, request.headers.get("authorization", ""))
