"""The Segment HTTP client: one `/v1/batch` POST of already-rendered messages, and its verdict.

It sends the outbox's stored bytes as they are (a messageId's payload never changes), authenticates
by HTTP Basic with `write_key:` (Segment, RudderStack and Jitsu all accept it), and never raises for
an HTTP or network failure: those are outcomes the relay records, so they come back as values.
The decisions (retry, pause, dead-letter, batch packing) are pure and live in core/delivery.py.
"""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import httpx

from subledger.core.delivery import (
    Backoff,
    Poisoned,
    Verdict,
    classify,
    encode_batch,
    excerpt,
)
from subledger.core.render import iso_millis

BATCH_PATH = "/v1/batch"


def _version() -> str:
    try:
        return version("subledger")
    except PackageNotFoundError:
        return "0"


@dataclass(frozen=True, slots=True)
class Response:
    """What came back: a status (None when nothing did), headers, a body excerpt, and the time taken."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    elapsed: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Sent:
    response: Response
    verdict: Verdict


@dataclass
class SegmentClient:
    """A keep-alive HTTP client for Segment-compatible endpoints; thread-safe (httpx.Client is)."""

    timeout: float = 15.0
    gzip: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    user_agent: str = field(default_factory=lambda: f"subledger/{_version()}")
    transport: httpx.BaseTransport | None = None
    _http: httpx.Client | None = field(default=None, init=False, repr=False)

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                timeout=httpx.Timeout(self.timeout),
                transport=self.transport,
                headers={"User-Agent": self.user_agent},
                follow_redirects=False,
                limits=httpx.Limits(max_keepalive_connections=8, max_connections=16),
            )
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def post(
        self,
        endpoint: str,
        write_key: str,
        messages: Sequence[bytes],
        *,
        gzip_body: bool | None = None,
        timeout: float | None = None,
    ) -> Response:
        """POST `{endpoint}/v1/batch` with the messages; every failure is a `Response`, never raised."""
        body = encode_batch(messages, iso_millis(datetime.now(UTC)))
        headers = {
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode(),
        }
        if self.gzip if gzip_body is None else gzip_body:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        started = time.perf_counter()
        try:
            reply = self._client().post(
                endpoint.rstrip("/") + BATCH_PATH,
                content=body,
                headers=headers,
                timeout=self.timeout if timeout is None else timeout,
            )
            content = reply.content
        except httpx.TimeoutException as exc:
            return self._failed("timeout", exc, started)
        except httpx.TransportError as exc:  # connection refused/reset, protocol errors, DNS
            return self._failed("connection error", exc, started)
        except httpx.RequestError as exc:  # an answer that cannot be read (a body that fails to decode)
            return self._failed("unreadable answer", exc, started)
        return Response(
            status=reply.status_code,
            headers=dict(reply.headers),
            body=content,
            elapsed=time.perf_counter() - started,
        )

    @staticmethod
    def _failed(kind: str, exc: Exception, started: float) -> Response:
        detail = f"{kind}: {type(exc).__name__}: {exc}".rstrip(": ")
        return Response(None, {}, detail.encode(), time.perf_counter() - started, error=detail)

    def send(
        self,
        endpoint: str,
        write_key: str,
        messages: Sequence[bytes],
        now: datetime,
        *,
        attempts: int = 0,
        jitter: float = 0.5,
        gzip_body: bool | None = None,
        timeout: float | None = None,
    ) -> Sent:
        """POST and classify. `now` dates retries; `attempts` are the rows' earlier failures."""
        response = self.post(endpoint, write_key, messages, gzip_body=gzip_body, timeout=timeout)
        verdict = classify(
            response.status, response.headers, response.body, now,
            attempts=attempts, jitter=jitter, backoff=self.backoff,
        )
        return Sent(response, verdict)


def oversize_verdict(size: int) -> Poisoned:
    """The dead-letter reason of a message too large to ever be accepted."""
    return Poisoned(f"message of {size} bytes exceeds Segment's 32 KB per-event limit; not sent")


def describe(response: Response) -> str:
    """One line for logs and the attempts record."""
    if response.status is None:
        return response.error or "no response"
    return f"{response.status} {excerpt(response.body, 200)}"
