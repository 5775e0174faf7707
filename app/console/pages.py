"""The console's pages: server-rendered HTML over the audit and outbox queries, no script needed.

Every page reads through store/audit.py, store/console.py and outbox/ops.py (indexed lookups and
bounded ranges; none reads `event_log` whole). Every action is a POST carrying the session's CSRF
token, answered first by a confirmation page (the same form with `confirm=yes`), then performed,
logged with the actor and reported by a one-shot flash message on the page it returns to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from subledger.app.console import auth, signature
from subledger.app.http.common import now_of, pool_of, services_of
from subledger.core.errors import LoginRequired, NotFound, PageRefused, UnknownTarget
from subledger.core.events import EARLIEST_TIME, LATEST_TIME, format_time
from subledger.core.lifecycle import TransitionKind
from subledger.core.safejson import text_problem
from subledger.outbox import ops
from subledger.outbox.ingest import wake_relay
from subledger.outbox.routes import routes_from
from subledger.store import audit, identity, reconciliation, rollups, sns_certificates, verify_runs
from subledger.store import console as queries
from subledger.store import outbox as outbox_store

log = logging.getLogger("subledger.console")
HERE = Path(__file__).resolve().parent
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = {
    # nothing is loaded from anywhere but this server; no page may be framed (clickjacking on actions)
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FEED_LIMIT = 100
FORM_LIMIT = 64 * 1024


# -- templates and formatting -------------------------------------------------------------------


def _utc(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime | None) -> str:
    return "" if value is None else format_time(value)


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def _money(amount: Any, currency: str | None = None) -> str:
    if amount is None or amount == "":
        return "—"
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        return str(amount)
    return f"{value:,.2f}" + (f" {currency}" if currency else "")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        text: str = value
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    shown: str = orjson.dumps(audit.jsonable(value), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    return shown


def _path(value: str) -> str:
    """A name as a path segment (subscription keys keep their slashes; `{who:path}` reads them back)."""
    return quote(value, safe="/:@")


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True,
)
TEMPLATES.filters.update(utc=_utc, iso=_iso, num=_num, money=_money, age=_age, pretty=_pretty, p=_path,
                         signature=lambda e: signature.brief(e.source, e.arrival))


def _token(request: Request) -> str | None:
    return services_of(request).settings.api_token


def render(request: Request, session: auth.Session | None, name: str, status: int = 200,
           **context: Any) -> HTMLResponse:
    flash = auth.read_flash(_token(request), request.cookies.get(auth.FLASH_COOKIE))
    html = TEMPLATES.get_template(name).render(
        session=session, csrf=session.csrf if session else "", flash=flash, now=now_of(request),
        nav=name.removesuffix(".html"), **context)
    response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
    if flash is not None:
        response.delete_cookie(auth.FLASH_COOKIE, path="/console")
    return response


def redirect_with_flash(request: Request, to: str, text: str) -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    token = _token(request)
    if token:
        response.set_cookie(auth.FLASH_COOKIE, auth.sign_flash(token, text[:500]), max_age=60, path="/console",
                            httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return response


# -- who is asking ------------------------------------------------------------------------------


def current(request: Request) -> auth.Session:
    """FastAPI dependency: the signed-in session or the bearer client; otherwise off to sign in."""
    token, now = _token(request), now_of(request)
    session = (auth.bearer_session(token, request.headers.get("authorization", ""))
               or auth.read_session(token, request.cookies.get(auth.SESSION_COOKIE), now))
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target if request.method == "GET" else "/console")
    return session


async def form_of(request: Request) -> dict[str, list[str]]:
    """The urlencoded form body (python-multipart is not a dependency; the console posts no files)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise PageRefused(413, "form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        raise PageRefused(400, "the form could not be read") from None
    for name, values in fields.items():
        for text in (name, *values):
            problem = text_problem(text)
            if problem is not None:
                raise PageRefused(400, f"form field {name[:40]!r} {problem}")
    return fields


def acting(session: auth.Session = Depends(current), form: dict[str, list[str]] = Depends(form_of)) -> auth.Session:
    """FastAPI dependency of every action: a session and its CSRF token (403 without)."""
    if not auth.csrf_ok(session, _one(form, "csrf")):
        raise PageRefused(403, "this form has no valid CSRF token; reload the page and try again")
    return session


def _one(form: Mapping[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _safe_next(value: str | None) -> str:
    """Only a console path may be a redirect target after sign-in (no open redirect)."""
    if not value or not value.startswith("/console") or value.startswith("//") or "\\" in value:
        return "/console"
    parts = urlsplit(value)
    return "/console" if parts.scheme or parts.netloc else value


def _time(value: str | None, name: str) -> datetime | None:
    """A time field: RFC 3339, or a `datetime-local` value (no offset: UTC, as the label says)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        instant = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise PageRefused(400, f"{name}: not a time (use YYYY-MM-DDTHH:MM, UTC)") from None
    if not EARLIEST_TIME <= instant < LATEST_TIME:
        raise PageRefused(400, f"{name}: out of range")
    return instant


def _local_input(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


# -- the router ---------------------------------------------------------------------------------

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/login")
def login_page(request: Request, next: str = "/console") -> HTMLResponse:
    nonce = auth.login_nonce()
    response = render(request, None, "login.html", next=_safe_next(next), login_csrf=nonce, error=None,
                      configured=bool(_token(request)))
    response.set_cookie(auth.LOGIN_COOKIE, nonce, max_age=3600, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    return response


def throttle_of(request: Request) -> auth.LoginThrottle:
    """The app's sign-in throttle (made by `install`: one per app, so each test's app starts clean)."""
    throttle: auth.LoginThrottle = request.app.state.console_login_throttle
    return throttle


@router.post("/login")
def login(request: Request, form: dict[str, list[str]] = Depends(form_of)) -> Response:
    token, given = _token(request), _one(form, "token") or ""
    target = _safe_next(_one(form, "next"))
    throttle, client, now = throttle_of(request), request.client.host if request.client else "?", now_of(request)
    wait = throttle.retry_after(client, now)
    if wait is not None:
        log.warning("console: sign-in from %s refused: %d failed attempts in %d s", client, throttle.limit,
                    int(throttle.window))
        refused = render(request, None, "throttled.html", status=429, wait=wait, limit=throttle.limit,
                         window=int(throttle.window))
        refused.headers["Retry-After"] = str(wait)
        return refused
    nonce = request.cookies.get(auth.LOGIN_COOKIE) or ""
    if not nonce or not auth.token_matches(nonce, _one(form, "login_csrf") or ""):
        raise PageRefused(403, "the sign-in form expired or came from elsewhere; reload it and try again")
    if not auth.token_matches(token, given):
        throttle.failed(client, now)
        log.warning("console: failed sign-in from %s", client)
        fresh = auth.login_nonce()
        refused = render(request, None, "login.html", status=401, next=target, login_csrf=fresh,
                         error="wrong token" if token else "no API token is configured on the server",
                         configured=bool(token))
        refused.set_cookie(auth.LOGIN_COOKIE, fresh, max_age=3600, path="/console", httponly=True,
                           samesite="strict", secure=request.url.scheme == "https")
        return refused
    throttle.succeeded(client)
    session, cookie = auth.new_session(given, now)
    log.info("console: %s signed in from %s", session.actor, client)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(auth.SESSION_COOKIE, cookie, max_age=auth.SESSION_SECONDS, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    response.delete_cookie(auth.LOGIN_COOKIE, path="/console")
    return response


@router.post("/logout")
def logout(request: Request, session: auth.Session = Depends(acting)) -> Response:
    log.info("console: %s signed out", session.actor)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(auth.SESSION_COOKIE, path="/console")
    return response


@router.get("/static/{name}")
def static(name: str, session: auth.Session = Depends(current)) -> Response:
    if name not in STATIC:
        raise PageRefused(404, "no such file")
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


def _destinations(request: Request, conn: Any) -> list[dict[str, Any]]:
    """Every (app, destination) the configuration or the database knows, with its backlog and pause."""
    policy = services_of(request).policy
    depths = outbox_store.depths(conn, now_of(request))
    paused = queries.paused(conn)
    names = {(app, d.name) for app, dests in policy.destinations.items() for d in dests}
    names |= set(depths) | set(paused)
    out = []
    for app_id, destination in sorted(names):
        depth = depths.get((app_id, destination))
        held = paused.get((app_id, destination))
        out.append({
            "app_id": app_id, "destination": destination,
            "pending": depth.pending if depth else 0, "dead": depth.dead if depth else 0,
            "oldest": depth.oldest_pending_seconds if depth else None,
            "paused": held is not None, "reason": held["paused_reason"] if held else None,
            "paused_at": held["paused_at"] if held else None,
        })
    return out


@router.get("")
def overview(request: Request, session: auth.Session = Depends(current)) -> HTMLResponse:
    now = now_of(request)
    days = rollups.Days.ending(now.astimezone(UTC).date(), 30)  # the charts' 30 UTC days, today included
    with pool_of(request).connection() as conn:
        stats = audit.stats(conn, days.since, days.until, now)
        by_day = rollups.transitions_by_day(conn, days)
        revenue = queries.revenue_by_day(conn, days)
        destinations = _destinations(request, conn)
        last_verify = verify_runs.last(conn)
        gaps = _gaps(conn, now)
    ingested: dict[str, int] = {}
    for row in stats.log:
        ingested[row["app_id"]] = ingested.get(row["app_id"], 0) + int(row["entries"])
    kinds: dict[str, int] = {}
    for row in stats.transitions:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + int(row["live"])
    return render(request, session, "overview.html", stats=stats, ingested=ingested, kinds=kinds,
                  chart=_chart(by_day, now.date()), destinations=destinations,
                  revenue=_revenue_charts(revenue, now.date()), last_verify=last_verify,
                  verify_age=None if last_verify is None else (now - last_verify.finished_at).total_seconds(),
                  gaps=gaps)


def _gaps(conn: Any, now: datetime) -> list[dict[str, Any]]:
    """Per (app, source): log entries reconciliation recovered (push never delivered them), in all
    and in the last 24 h, both counted on the partial index `event_log_not_pushed`."""
    total = reconciliation.recovered_counts(conn)
    recent = reconciliation.recovered_since(conn, now - reconciliation.GAP_WINDOW)  # the gap report's window
    return [{"app_id": app_id, "source": source, "total": n, "recent": recent.get((app_id, source), 0)}
            for (app_id, source), n in sorted(total.items())]


def _revenue_charts(rows: list[queries.Revenue], today: date) -> list[dict[str, Any]]:
    """One bar chart per (app, currency): net revenue per UTC day for the last 30 days, as SVG
    geometry; a day whose refunds outweigh its charges is drawn below the baseline."""
    days = [today - timedelta(days=n) for n in range(29, -1, -1)]
    series: dict[tuple[str, str], dict[date, queries.Revenue]] = {}
    for r in rows:
        series.setdefault((r.app_id, r.currency or ""), {})[r.day] = r
    height, width = 80.0, 18
    charts = []
    for (app_id, currency), by_day in sorted(series.items()):
        amounts = {d: by_day[d].amount if d in by_day else Decimal(0) for d in days}
        top = max(abs(a) for a in amounts.values()) or Decimal(1)
        has_negative = any(a < 0 for a in amounts.values())
        base = height / 2 if has_negative else height
        scale = base / float(top)
        bars = []
        for i, day in enumerate(days):
            amount = amounts[day]
            if not amount:
                continue
            h = round(abs(float(amount)) * scale, 2)
            bars.append({"x": i * (width + 2), "y": round(base - h, 2) if amount > 0 else base, "h": h, "w": width,
                         "day": day.isoformat(), "amount": amount, "negative": amount < 0,
                         "charges": by_day[day].charges if day in by_day else 0})
        charts.append({"app_id": app_id, "currency": currency or None, "bars": bars, "top": top,
                       "total": sum(amounts.values(), Decimal(0)),
                       "charges": sum(r.charges for r in by_day.values()), "base": base,
                       "width": len(days) * (width + 2), "height": height, "first": days[0], "last": days[-1],
                       "days": [(d, amounts[d]) for d in days if d in by_day]})
    return charts


def _chart(rows: list[tuple[Any, str, int]], today: date) -> dict[str, Any]:
    """Stacked bars per UTC day for the last 30 days, as SVG geometry (the template draws it)."""
    days = [today - timedelta(days=n) for n in range(29, -1, -1)]
    kinds = sorted({k for _, k, _ in rows})
    counts: dict[tuple[date, str], int] = {(d, k): n for d, k, n in rows}
    totals = {d: sum(counts.get((d, k), 0) for k in kinds) for d in days}
    top = max(totals.values(), default=0) or 1
    height, width = 120.0, 18
    bars = []
    for i, day in enumerate(days):
        y = height
        for k in kinds:
            n = counts.get((day, k), 0)
            if not n:
                continue
            h = n / top * height
            y -= h
            bars.append({"x": i * (width + 2), "y": round(y, 2), "h": round(h, 2), "w": width,
                         "kind": k, "cls": f"k{kinds.index(k) % 8}", "n": n, "day": day.isoformat()})
    return {"bars": bars, "kinds": [(k, f"k{i % 8}") for i, k in enumerate(kinds)], "top": top,
            "width": len(days) * (width + 2), "height": height, "first": days[0], "last": days[-1],
            "totals": totals}


@router.get("/search")
def search(request: Request, q: str = "", session: auth.Session = Depends(current)) -> Response:
    q = q.strip()
    hits: list[queries.Hit] = []
    if q:
        with pool_of(request).connection() as conn:
            hits = queries.find(conn, q, sorted(services_of(request).settings.apps))
        if len(hits) == 1:
            return RedirectResponse(f"/console/{_path(hits[0].path)}", status_code=303)
    return render(request, session, "search.html", q=q, hits=hits)


def load_subscriber(conn: Any, policy: Any, who: str, when: datetime) -> dict[str, Any] | None:
    """Everything the subscriber page shows, read through the audit's indexed queries (one home, so
    tests/test_console.py measures exactly what the page runs); None when `who` names nothing."""
    found = audit.timeline(conn, who)
    if not found.subscriptions:
        return None
    states = [audit.state_at(conn, key, when) for key in found.subscriptions]
    apps = {e.subscription_key: e.app_id for e in found.entries if e.subscription_key}
    links = identity.links_for(conn, [(apps[k], k) for k in found.subscriptions if k in apps])
    user_links = identity.links_of(conn, who)
    by_transition: dict[str, list[audit.Delivery]] = {}
    for d in found.deliveries:
        by_transition.setdefault(d.transition_id, []).append(d)
    names: dict[str, list[str]] = {}
    for t in found.transitions:
        sent = sorted({d.event for d in by_transition.get(t.id, []) if d.event})
        try:
            kind = TransitionKind(t.kind)
        except ValueError:
            names[t.id] = sent
            continue
        app_id = apps.get(t.subscription_key, t.subscription_key.split("/")[0])
        names[t.id] = sent or sorted({d.event_name(kind) for d in policy.destinations_for(app_id)})
    link_messages = [d for d in found.deliveries if d.transition_id.startswith("link:")]
    return {"found": found, "states": states, "by_transition": by_transition, "names": names, "links": links,
            "user_links": user_links, "link_messages": link_messages}


@router.get("/subscribers/{who:path}")
def subscriber(request: Request, who: str, at: str | None = None,
               session: auth.Session = Depends(current)) -> HTMLResponse:
    when = _time(at, "at") or now_of(request)
    with pool_of(request).connection() as conn:
        page = load_subscriber(conn, services_of(request).policy, who, when)
    if page is None:
        raise PageRefused(404, f"no subscription found for {who!r}")
    return render(request, session, "subscriber.html", who=who, at=when, at_input=_local_input(when) if at else "",
                  **page)


@router.get("/entries/{position}")
def entry(request: Request, position: str, session: auth.Session = Depends(current)) -> HTMLResponse:
    if not position.isascii() or not position.isdigit() or int(position) >= 2**63:
        raise PageRefused(404, f"no log entry {position!r}")
    with pool_of(request).connection() as conn:
        found = queries.entry(conn, int(position))
        if found is None:
            raise PageRefused(404, f"no log entry #{position}")
        sns = _sns_check(request, conn, found) if found["source"] == "amazon" else None
    checked = signature.verdict(found["source"], found["arrival"], found.pop("raw_bytes"),
                                _offline_apple(request) if found["source"] == "apple" else None, sns)
    return render(request, session, "entry.html", entry=found, signature=checked)


def _sns_check(request: Request, conn: Any, found: dict[str, Any]) -> signature.SnsCheck:
    """The entry's app's SNS certificate hosts, and its envelope's kept certificate (one point
    lookup by URL, read now so the page's connection is not held while it renders)."""
    url = signature.certificate_url(found["raw_bytes"])
    kept = None if url is None else sns_certificates.load(conn, url)
    return signature.SnsCheck(signature.sns_hosts(services_of(request).settings, found["app_id"]), kept)


def _offline_apple(request: Request) -> Any:
    """The Apple adapters that re-verify stored bodies (offline), built on first use per app."""
    state = request.app.state
    if not hasattr(state, "console_apple"):
        state.console_apple = signature.safe_offline_apple(services_of(request).settings)
    return state.console_apple


@router.get("/explain/{ref}")
def explain(request: Request, ref: str, session: auth.Session = Depends(current)) -> HTMLResponse:
    with pool_of(request).connection() as conn:
        found = audit.explain(conn, ref)
    if found is None:
        raise PageRefused(404, f"no transition or message {ref!r}")
    by_message: dict[str, list[dict[str, Any]]] = {}
    for a in found.attempts:
        by_message.setdefault(a["message_id"], []).append(a)
    return render(request, session, "explain.html", ref=ref, x=found, by_message=by_message)


@router.get("/deliveries")
def deliveries(request: Request, app_id: str = "", destination: str = "", status: str = "", since: str = "",
               until: str = "", session: auth.Session = Depends(current)) -> HTMLResponse:
    if status not in ("", "pending", "dead", "delivered"):
        raise PageRefused(400, "status: one of pending, dead, delivered")
    start, end = _time(since, "since"), _time(until, "until")
    with pool_of(request).connection() as conn:
        items = queries.feed(conn, app_id=app_id or None, destination=destination or None, status=status or None,
                             since=start, until=end, limit=FEED_LIMIT)
    older = None
    if len(items) == FEED_LIMIT:
        older = {"app_id": app_id, "destination": destination, "status": status, "since": since,
                 "until": _local_input(items[-1].at)}
    return render(request, session, "deliveries.html", items=items, older=older,
                  filters={"app_id": app_id, "destination": destination, "status": status, "since": since,
                           "until": until}, apps=sorted(services_of(request).settings.apps))


@router.get("/messages/{message_id}")
def message(request: Request, message_id: str, session: auth.Session = Depends(current)) -> HTMLResponse:
    with pool_of(request).connection() as conn:
        found = queries.message(conn, message_id)
    if found is None:
        raise PageRefused(404, f"no message {message_id!r}")
    route = routes_from(services_of(request).settings.apps).get((found.row["app_id"], found.row["destination"]))
    return render(request, session, "message.html", m=found.row, attempts=found.attempts,
                  endpoint=route.endpoint.rstrip("/") + "/v1/batch" if route else None)


@router.get("/dead")
def dead(request: Request, app_id: str = "", session: auth.Session = Depends(current)) -> HTMLResponse:
    with pool_of(request).connection() as conn:
        rows = outbox_store.list_rows(conn, status="dead", app_id=app_id or None, limit=500)
    return render(request, session, "dead.html", rows=rows, app_id=app_id)


@router.get("/destinations")
def destinations(request: Request, session: auth.Session = Depends(current)) -> HTMLResponse:
    with pool_of(request).connection() as conn:
        found = _destinations(request, conn)
    return render(request, session, "destinations.html", destinations=found)


def _confirm(request: Request, session: auth.Session, action: str, question: str,
             fields: list[tuple[str, str]], back: str) -> HTMLResponse:
    return render(request, session, "confirm.html", action=action, question=question, fields=fields, back=back)


@router.post("/dead/retry")
def retry(request: Request, session: auth.Session = Depends(acting),
          form: dict[str, list[str]] = Depends(form_of)) -> Response:
    refs = [r for r in form.get("ref", []) if r]
    every = _one(form, "all") == "yes"
    back = _safe_next(_one(form, "back") or "/console/dead")
    if not refs and not every:
        return redirect_with_flash(request, back, "nothing selected to retry")
    if _one(form, "confirm") != "yes":
        what = "every dead message" if every else (refs[0] if len(refs) == 1 else f"{len(refs)} dead messages")
        fields = [("all", "yes")] if every else [("ref", r) for r in refs]
        return _confirm(request, session, "/console/dead/retry", f"Retry {what}? They keep their messageId.",
                        [*fields, ("back", back)], back)
    services, now = services_of(request), now_of(request)
    requeued: list[str] = []
    problems: list[str] = []
    with pool_of(request).connection() as conn:
        with conn.transaction():
            for ref in [None] if every else refs:
                try:
                    result = ops.retry(conn, services.policy, now, ref=ref, dead=ref is None)
                except NotFound as exc:
                    problems.append(str(exc))
                    continue
                requeued += result.requeued
                problems += [f"{m} still dead: {reason}" for m, reason in result.still_dead]
        if requeued:
            wake_relay(conn)
    log.info("console: %s retried %d message(s): %s", session.actor, len(requeued), ", ".join(requeued[:20]))
    text = f"requeued {len(requeued)} message{'s' * (len(requeued) != 1)}"
    return redirect_with_flash(request, back, text + (f"; {'; '.join(problems[:5])}" if problems else ""))


def _pause_or_resume(request: Request, session: auth.Session, form: dict[str, list[str]], verb: str,
                     perform: Callable[[Any, str, list[str]], None]) -> Response:
    app_id, destination = _one(form, "app_id") or "", _one(form, "destination") or None
    if not app_id:
        raise PageRefused(400, "app_id: required")
    name = f"{app_id} / {destination}" if destination else f"every destination of {app_id}"
    if _one(form, "confirm") != "yes":
        fields = [("app_id", app_id)] + ([("destination", destination)] if destination else [])
        return _confirm(request, session, f"/console/destinations/{verb}", f"{verb.capitalize()} {name}?",
                        fields, "/console/destinations")
    services = services_of(request)
    with pool_of(request).connection() as conn:
        with conn.transaction():
            try:
                names = ops.targets(conn, services.policy, app_id, destination, resuming=verb == "resume")
            except UnknownTarget as exc:
                raise PageRefused(404, str(exc)) from None
            perform(conn, app_id, names)
        if verb == "resume":
            wake_relay(conn)
    log.info("console: %s %sd %s", session.actor, verb, ", ".join(f"{app_id}/{n}" for n in names))
    return redirect_with_flash(request, "/console/destinations", f"{verb}d {name}")


@router.post("/destinations/pause")
def pause(request: Request, session: auth.Session = Depends(acting),
          form: dict[str, list[str]] = Depends(form_of)) -> Response:
    now = now_of(request)

    def perform(conn: Any, app_id: str, names: list[str]) -> None:
        ops.pause(conn, app_id, names, now, f"{ops.PAUSED_BY_OPERATOR} ({session.actor})")

    return _pause_or_resume(request, session, form, "pause", perform)


@router.post("/destinations/resume")
def resume(request: Request, session: auth.Session = Depends(acting),
           form: dict[str, list[str]] = Depends(form_of)) -> Response:
    def perform(conn: Any, app_id: str, names: list[str]) -> None:
        for name in names:
            ops.resume(conn, app_id, name)

    return _pause_or_resume(request, session, form, "resume", perform)
