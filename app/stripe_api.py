"""Stripe's events API, read for reconciliation: `GET /v1/events`, page by page, with backoff.

Why httpx rather than the `stripe` library's client: the base URL must point at a local fake in
the tests and at a proxy in some deployments, and one `httpx.Client` with `base_url` does that
without touching the library's global state (`stripe.api_base` is process-wide). The mapping of
each listed event is the webhook adapter's own (core/sources/stripe.py).

Stripe lists events newest first, at most 100 a page, `has_more` and `starting_after=<last id>`
for the next; `created[gte]` bounds the window (Stripe keeps 30 days); `delivery_success=false`
keeps the events whose webhook deliveries failed. A 429 (or a 5xx, or no answer) is retried with
exponential backoff, honouring `Retry-After` when Stripe sends one; after the retries the run
stops with `SourceUnavailable` and records nothing, so the next run reads the window again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import httpx

from subledger.core.errors import CredentialsRefused, PayloadRejected, SourceUnavailable
from subledger.core.sources import stripe as stripe_source

PAGE_SIZE: Final = 100
MAX_RETRY_AFTER: Final = 30.0


@dataclass
class Calls:
    """What a run asked of the API: requests sent (retries included), pages read, 429s met."""

    requests: int = 0
    pages: int = 0
    throttled: int = 0


@dataclass
class StripeEvents:
    """A reader of one account's events; `calls` counts every request, for the run's summary."""

    api_key: str
    base_url: str
    timeout: float = 10.0
    retries: int = 5
    backoff_seconds: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    calls: Calls = field(default_factory=Calls)
    client: httpx.Client | None = None

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = httpx.Client(
                base_url=self.base_url, timeout=self.timeout, follow_redirects=False,
                headers={"Authorization": f"Bearer {self.api_key}"},
            )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def pages(self, since: datetime, *, failures_only: bool) -> Iterator[stripe_source.EventsPage]:
        """Every page of events created at or after `since`, newest first."""
        params: dict[str, str | int] = {"limit": PAGE_SIZE, "created[gte]": int(since.timestamp())}
        if failures_only:
            params["delivery_success"] = "false"
        while True:
            page = self._page(params)
            self.calls.pages += 1
            yield page
            if not page.has_more or page.last_id is None:
                return
            params = {**params, "starting_after": page.last_id}

    def _page(self, params: dict[str, str | int]) -> stripe_source.EventsPage:
        assert self.client is not None
        problem = ""
        for attempt in range(1 + self.retries):
            self.calls.requests += 1
            try:
                response = self.client.get("/v1/events", params=params)
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
                self._wait(attempt, None)
                continue
            status = response.status_code
            if status == 200:
                try:
                    return stripe_source.events_page(response.content)
                except PayloadRejected as exc:
                    raise SourceUnavailable(f"Stripe's events list is not a list of events: {exc}") from None
            if status in (401, 403):
                raise CredentialsRefused(f"Stripe refused the API key (HTTP {status}): check "
                                         "[apps.<app>.stripe] api_key (it needs read access to events)")
            if status == 429 or status >= 500:
                self.calls.throttled += status == 429
                problem = f"HTTP {status}"
                self._wait(attempt, response.headers.get("retry-after"))
                continue
            raise SourceUnavailable(f"Stripe answered the events list with HTTP {status}")
        raise SourceUnavailable(f"Stripe's events list did not answer after {1 + self.retries} attempts ({problem})")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.retries:
            return
        try:
            delay = min(float(retry_after), MAX_RETRY_AFTER) if retry_after else None
        except ValueError:
            delay = None
        self.sleep(delay if delay is not None and delay >= 0 else self.backoff_seconds * 2 ** attempt)
