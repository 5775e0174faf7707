"""Who may see the console: a signed session cookie after signing in with the API token, or a bearer token.

Why hand-written: the session is three fields (version, expiry, a random session id) and one
HMAC-SHA256 over them; a library (itsdangerous, Starlette's SessionMiddleware) would add a
dependency for twenty lines. The signing key is derived from the API token
(HMAC(token, "subledger console session v1")), so changing the token signs every session out and
nothing else needs to be configured or stored.

Cookie `subledger_console`: `v1.<expiry unix seconds>.<session id>.<signature>`, HttpOnly,
SameSite=Strict, Path=/console, Secure when the request came over https, Max-Age = the expiry.

CSRF: every POST carries a `csrf` field equal to HMAC(key, "csrf." + session id) (a session-bound
token: nothing to store, and useless with another session). The sign-in form, which has no session
yet, uses a double-submit cookie (`subledger_console_login`). A request authenticated by
`Authorization: Bearer` needs no CSRF token: a browser never attaches that header by itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime

SESSION_COOKIE = "subledger_console"
LOGIN_COOKIE = "subledger_console_login"
FLASH_COOKIE = "subledger_console_flash"
SESSION_SECONDS = 8 * 3600
VERSION = "v1"


def signing_key(token: str) -> bytes:
    return hmac.new(token.encode(), b"subledger console session v1", hashlib.sha256).digest()


def _sign(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser (`via` = "cookie") or a script presenting the token (`via` = "bearer")."""

    via: str
    session_id: str
    expires: int
    csrf: str

    @property
    def actor(self) -> str:
        """Who acted, for the log: the session id's first characters identify a sign-in, not a person."""
        return f"console session {self.session_id[:8]}" if self.via == "cookie" else "bearer token"


def new_session(token: str, now: datetime) -> tuple[Session, str]:
    """A fresh session and the cookie value that carries it."""
    session_id = secrets.token_urlsafe(18)
    expires = int(now.timestamp()) + SESSION_SECONDS
    key = signing_key(token)
    body = f"{VERSION}.{expires}.{session_id}"
    return Session("cookie", session_id, expires, _sign(key, "csrf." + session_id)), f"{body}.{_sign(key, body)}"


def read_session(token: str | None, cookie: str | None, now: datetime) -> Session | None:
    """The session a cookie carries, or None when it is missing, forged, malformed or expired."""
    if not token or not cookie:
        return None
    parts = cookie.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not parts[1].isascii() or not parts[1].isdigit():
        return None
    key = signing_key(token)
    body = ".".join(parts[:3])
    if not hmac.compare_digest(_sign(key, body), parts[3]):
        return None
    expires = int(parts[1])
    if expires <= now.timestamp():
        return None
    return Session("cookie", parts[2], expires, _sign(key, "csrf." + parts[2]))


def bearer_session(token: str | None, header: str) -> Session | None:
    """A session for `Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = header.partition(" ")
    if not token or scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    return Session("bearer", "bearer", 0, "")


def login_nonce() -> str:
    """The sign-in form's double-submit value (a cookie and a hidden field that must agree)."""
    return secrets.token_urlsafe(18)


def token_matches(token: str | None, given: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), (token or "").encode())


def csrf_ok(session: Session, given: str | None) -> bool:
    """A POST is allowed with the session's CSRF token, or from a bearer client (no ambient credentials)."""
    if session.via == "bearer":
        return True
    return bool(given) and hmac.compare_digest((given or "").encode(), session.csrf.encode())


def sign_flash(token: str, text: str) -> str:
    data = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()
    return f"{data}.{_sign(signing_key(token), 'flash.' + data)}"


def read_flash(token: str | None, cookie: str | None) -> str | None:
    """The one-shot message an action left for the next page; a forged one is ignored."""
    if not token or not cookie or "." not in cookie:
        return None
    data, _, sig = cookie.partition(".")
    if not hmac.compare_digest(_sign(signing_key(token), "flash." + data), sig):
        return None
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


class LoginThrottle:
    """Failed sign-ins per client address in a sliding window: after `limit` failures within
    `window` seconds, the sign-in form refuses that address (429) until the oldest one ages out.

    In memory, per process: it slows guessing of the API token through the form to `limit` tries a
    minute per address without any table or shared store; a restart forgets it, several `serve`
    processes each count their own, and behind a reverse proxy every client shares the proxy's
    address (the limit then holds for all of them together). At most `max_clients` addresses are
    remembered; past that the one seen least recently is forgotten first.
    """

    def __init__(self, limit: int = 5, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit, self.window, self.max_clients = limit, window, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: datetime) -> int | None:
        """Seconds until `client` may try again, or None when it may try now."""
        t = now.timestamp()
        with self._lock:
            times = self._recent(client, t)
            if times is None or len(times) < self.limit:
                return None
            return max(1, math.ceil(times[0] + self.window - t))

    def failed(self, client: str, now: datetime) -> None:
        t = now.timestamp()
        with self._lock:
            times = self._recent(client, t)
            if times is None:
                times = self._failures[client] = deque()
            times.append(t)
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _recent(self, client: str, t: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= t - self.window:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times
