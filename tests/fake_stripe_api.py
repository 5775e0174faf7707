"""A fake Stripe API on 127.0.0.1: `GET /v1/events` as Stripe answers it, for the reconciliation tests
(tests/test_reconcile_stripe.py, tests/test_reconcile_schedule.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API_KEY = "rk_test_reconcile"


class FakeStripe:
    """`GET /v1/events` as Stripe answers it: newest first, `created[gte]`, `delivery_success=false`,
    `starting_after`, `has_more`; pages of `page_size` (Stripe caps `limit`); 429 for the first `throttle` calls."""

    def __init__(self, events: list[dict[str, Any]], failed: set[str], *, page_size: int = 2,
                 throttle: int = 1, faults: dict[int, int] | None = None) -> None:
        self.events, self.failed, self.page_size, self.throttle = events, failed, page_size, throttle
        self.faults = faults or {}  # request number (1-based) → the status answered instead of the page
        self.requests: list[dict[str, list[str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                fake.requests.append(query)
                if self.headers.get("authorization") != f"Bearer {API_KEY}":
                    return self._reply(401, {"error": {"message": "Invalid API Key provided"}})
                if len(fake.requests) <= fake.throttle:
                    return self._reply(429, {"error": {"message": "Too many requests"}}, {"Retry-After": "0"})
                fault = fake.faults.get(len(fake.requests))
                if fault == 200:
                    return self._reply(200, {"object": "list", "data": [{"no": "id"}]})
                if fault is not None:
                    return self._reply(fault, {"error": {"message": "boom"}})
                if url.path != "/v1/events":
                    return self._reply(404, {"error": {"message": "no such route"}})
                self._reply(200, fake.page(query))

            def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def page(self, query: dict[str, list[str]]) -> dict[str, Any]:
        since = int(query.get("created[gte]", ["0"])[0])
        chosen = sorted((e for e in self.events if e["created"] >= since), key=lambda e: (-e["created"], e["id"]))
        if query.get("delivery_success") == ["false"]:
            chosen = [e for e in chosen if e["id"] in self.failed]
        after = query.get("starting_after", [None])[0]
        if after is not None:
            chosen = chosen[[e["id"] for e in chosen].index(after) + 1:]
        limit = min(int(query.get("limit", ["10"])[0]), self.page_size)
        return {"object": "list", "url": "/v1/events", "data": chosen[:limit], "has_more": len(chosen) > limit}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeStripe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
