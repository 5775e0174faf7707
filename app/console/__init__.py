"""The web console at `/console`: a subscriber's story, the deliveries and the health, as HTML pages.

`install(app)` mounts the pages (app/console/pages.py) and the two handlers that turn a missing
sign-in into a redirect to the sign-in page and a refused console request into an HTML page (the
JSON API's handlers stay as they are). Sessions and CSRF: app/console/auth.py.
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from subledger.app.console import auth, pages
from subledger.core.errors import LoginRequired, PageRefused


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.state.console_login_throttle = auth.LoginThrottle()  # failed sign-ins per address (in memory)

    @app.exception_handler(LoginRequired)
    async def _login(_: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/console/login?next={quote(exc.next_path, safe='')}", status_code=303)

    @app.exception_handler(PageRefused)
    async def _refused(request: Request, exc: PageRefused) -> Response:
        session = None
        with contextlib.suppress(LoginRequired):
            session = pages.current(request)
        return pages.render(request, session, "error.html", status=exc.status, message=exc.message)
